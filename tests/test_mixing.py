"""Mixup and CutMix: what they do to a batch and its loss, seeded per epoch, and a
training run that uses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skinlesion import PipelineError, params
from skinlesion.training import mixing
from tests.test_training import (
    config,
    data,  # noqa: F401 - the module's fixture
    fit,
)


def batch(n=8, size=16):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((n, 3, size, size), generator=generator)
    labels = torch.arange(n) % 7
    rows = [torch.rand((n, 5), generator=generator)]
    return images, labels, rows


def test_mixup_blends_images_metadata_and_loss_by_one_weight():
    images, labels, rows = batch()
    mixed = mixing.Mixer(mixup=0.4, cutmix=0.0, seed=1, epoch=3)(images, labels, rows)
    assert 0 < mixed.lam < 1
    # recover the partner from the labels' permutation: every image is lam * itself + (1 - lam) * its partner
    pairs = torch.randperm(len(images), generator=torch.Generator().manual_seed(
        mixing.stable_seed(1, "mix-pairs", 3)))
    assert torch.equal(mixed.partner, labels[pairs])
    assert torch.allclose(mixed.images, mixed.lam * images + (1 - mixed.lam) * images[pairs])
    assert torch.allclose(mixed.patient[0], mixed.lam * rows[0] + (1 - mixed.lam) * rows[0][pairs])
    logits = torch.randn((len(images), 7), generator=torch.Generator().manual_seed(2))
    criterion = torch.nn.CrossEntropyLoss()
    expected = mixed.lam * criterion(logits, labels) + (1 - mixed.lam) * criterion(logits, labels[pairs])
    assert torch.allclose(mixing.mixed_loss(criterion, logits, labels, mixed), expected)


def test_cutmix_pastes_one_box_and_weighs_the_loss_by_its_area():
    images, labels, rows = batch()
    mixed = mixing.Mixer(mixup=0.0, cutmix=1.0, seed=5, epoch=1)(images, labels, rows)
    pairs = torch.randperm(len(images), generator=torch.Generator().manual_seed(
        mixing.stable_seed(5, "mix-pairs", 1)))
    pasted = (mixed.images != images).any(dim=(0, 1))  # the box, where any image changed
    changed = pasted.nonzero()
    assert len(changed), "no box was pasted"
    y0, x0 = changed.min(dim=0).values.tolist()
    y1, x1 = (changed.max(dim=0).values + 1).tolist()
    assert pasted.sum() == (y1 - y0) * (x1 - x0), "what changed is not one box"
    assert torch.equal(mixed.images[:, :, y0:y1, x0:x1], images[pairs][:, :, y0:y1, x0:x1])
    assert mixed.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 16 ** 2)


def test_the_box_is_clipped_at_the_edges():
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.3, 0.9, 0.999):
        for _ in range(50):
            y0, y1, x0, x1 = mixing.cut_box(15, 20, lam, rng)
            assert 0 <= y0 <= y1 <= 15 and 0 <= x0 <= x1 <= 20


def test_draws_depend_on_seed_and_epoch_only():
    images, labels, rows = batch()
    first = mixing.Mixer(0.4, 1.0, seed=3, epoch=2)
    again = mixing.Mixer(0.4, 1.0, seed=3, epoch=2)
    other = mixing.Mixer(0.4, 1.0, seed=3, epoch=4)
    a = [first(images, labels, rows) for _ in range(6)]
    b = [again(images, labels, rows) for _ in range(6)]
    c = [other(images, labels, rows) for _ in range(6)]
    assert all(x.lam == y.lam and torch.equal(x.images, y.images) for x, y in zip(a, b))
    assert any(x.lam != z.lam for x, z in zip(a, c))
    kinds = {bool(((x.images - images).abs() > 0).all()) for x in a + c}  # mixup changes every pixel, CutMix a box
    assert kinds == {True, False}, "with both alphas on, batches should be mixed both ways"


def test_mixing_is_off_at_zero():
    assert not mixing.Mixer(0, 0, seed=0, epoch=1).active
    assert mixing.Mixer(0.2, 0, seed=0, epoch=1).active


def test_negative_alphas_are_refused():
    with pytest.raises(PipelineError, match="train.cutmix"):
        settings = config().train.model_dump()
        params.check(params.schema_at("train"), {**settings, "cutmix": -1.0}, "train")


def test_a_mixed_run_trains_and_differs_from_an_unmixed_one(data, tmp_path):  # noqa: F811
    plain = fit(tmp_path / "plain", config(epochs=1, augment="none"), data=data)
    mixed = fit(tmp_path / "mixed", config(epochs=1, augment="none", mixup=0.4, cutmix=1.0, metadata=False),
                data=data)
    assert np.isfinite(mixed["val_loss"]) and mixed["val_loss"] != plain["val_loss"]

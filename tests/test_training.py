"""The training loop on synthetic data, on CPU: it learns, saves a self-describing
model, resumes exactly after an interruption, stops early, freezes and unfreezes."""

from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from skinlesion import PipelineError, modelfile, params
from skinlesion.data import balance, download, prepare, split
from skinlesion.evaluation.metrics import headline
from skinlesion.training import losses, train
from skinlesion.training.devices import amp_dtype, cpu_has_bf16
from skinlesion.training.loader import ArrayLoader
from skinlesion.training.schedule import Schedule
from tests.conftest import PROJECT, group

AUGMENT = group("balance").augment
DEFAULTS = yaml.safe_load((PROJECT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def data(synthetic_zips, tmp_path_factory) -> train.TrainData:
    """The data stages' real output for the synthetic set, at 32 px."""
    root = tmp_path_factory.mktemp("training")
    download.download(group("download", source="local", path=str(synthetic_zips), retries=0, max_unpacked_gb=1),
                     root / "raw", root / "cache")
    prepare.prepare(root / "raw", root / "prepared", 32)
    manifests = split.split(pd.read_csv(root / "raw/metadata.csv", dtype=str), 0.15, 0.15, seed=0)
    (root / "split").mkdir()
    for name, manifest in manifests.items():
        manifest.to_csv(root / "split" / f"{name}.csv", index=False)
    loaded = prepare.Prepared(root / "prepared")
    planned = balance.plan(manifests["train"], "threshold", 12, seed=0)
    images = balance.render(planned, loaded.images, loaded.rows(planned.image_id), AUGMENT, 0)
    (root / "balanced").mkdir()
    np.save(root / "balanced/images.npy", images)
    planned.to_csv(root / "balanced/train.csv", index=False)
    return train.load_data(root / "balanced", root / "split", root / "prepared")


def config(model="simple_cnn", **train_settings) -> train.Config:
    settings = copy.deepcopy(DEFAULTS["train"])
    # flips, plain shuffling and images alone, whatever the default recipe: these tests are about the loop
    settings.update({"epochs": 2, "batch_size": 16, "lr": 0.003, "augment": "flips", "sampler": "shuffle",
                     "ema": 0.0, "select": "balanced_accuracy", "early_stopping_patience": 5, "metadata": False,
                     **train_settings})
    return train.Config(model, params.typed(params.schema_at(f"models.{model}"), DEFAULTS["models"][model]),
                        params.Train(**settings), DEFAULTS["ensemble"]["seeds"][0])


def fit(tmp_path, cfg, **kwargs) -> dict:
    return train.fit(cfg, kwargs.pop("data"), model_path=tmp_path / "model.pt", live_dir=tmp_path / "live",
                        checkpoint_dir=tmp_path / "checkpoints", **kwargs)


def tsv(tmp_path, name) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "live/plots/metrics" / f"{name}.tsv", sep="\t")


def test_one_epoch_writes_a_self_describing_model(data, tmp_path):
    summary = fit(tmp_path, config(epochs=1), data=data)
    assert summary["epochs_run"] == 1 and summary["best_epoch"] == 1 and summary["parameters"] > 0
    assert 0 < summary["train_seconds"] < 600
    model, info = modelfile.load(tmp_path / "model.pt")
    assert info.architecture == "simple_cnn" and info.image_size == 32
    assert info.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert info.mean == [0.485, 0.456, 0.406] and info.training["epoch"] == 1
    loader = ArrayLoader(data.val_images, data.val_labels, batch_size=8, mean=info.mean, std=info.std,
                         device=torch.device("cpu"))
    probabilities, _ = train.probabilities(model, loader, None)
    again = headline(data.val_labels, probabilities)
    assert again["balanced_accuracy"] == pytest.approx(summary["val_balanced_accuracy"])
    for name in ("train/loss", "train/balanced_accuracy", "val/loss", "val/accuracy", "val/balanced_accuracy", "lr"):
        assert list(tsv(tmp_path, name).step) == [1], name


def test_training_loss_falls(data, tmp_path):
    fit(tmp_path, config(epochs=4, scheduler="none", warmup_epochs=0), data=data)
    loss = tsv(tmp_path, "train/loss")["loss"]
    assert loss.iloc[-1] < 0.7 * loss.iloc[0]


def _fit_in_child(cfg, data, folder) -> None:
    fit(folder, cfg, data=data)


def killed_after_first_checkpoint(cfg, data, folder) -> None:
    """Run ``fit`` in a real child process and SIGKILL it as soon as its first
    checkpoint exists: an interruption with no cooperation from the training code."""
    child = multiprocessing.get_context("spawn").Process(target=_fit_in_child, args=(cfg, data, folder))
    child.start()
    checkpoint, deadline = folder / "checkpoints/last.pt", time.monotonic() + 120
    while not checkpoint.exists():
        assert child.is_alive(), "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()


@pytest.mark.slow
@pytest.mark.parametrize("ema, mix", [(0.0, {}), (0.9, {}), (0.0, {"mixup": 0.4, "cutmix": 1.0})])
def test_killed_run_resumes_exactly(data, tmp_path, ema, mix):
    cfg = config(epochs=30, ema=ema, early_stopping_patience=0, **mix)
    fit(tmp_path / "whole", cfg, data=data)
    killed_after_first_checkpoint(cfg, data, tmp_path / "cut")
    done = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["state"]["epoch"]
    assert 1 <= done < 30
    (tmp_path / "cut/model.pt").unlink(missing_ok=True)  # as DVC does to a stage's outputs before rerunning it
    # as if the kill had come while DVCLive wrote: its summary cut short, a row past the checkpoint's epoch
    state = tmp_path / "cut/checkpoints/live"
    (state / "metrics.json").write_text("{")
    curve = state / "plots/metrics/val/loss.tsv"
    curve.write_text(curve.read_text() + curve.read_text().splitlines()[-1] + "\n")
    summary = fit(tmp_path / "cut", cfg, data=data)
    assert summary["epochs_run"] == 30
    assert (tmp_path / "cut/model.pt").read_bytes() == (tmp_path / "whole/model.pt").read_bytes()
    whole = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert list(tsv(tmp_path / "cut", "val/loss").step) == list(range(1, 31))
    assert tsv(tmp_path / "cut", "lr")["lr"].equals(tsv(tmp_path / "whole", "lr")["lr"])


@pytest.mark.slow
def test_a_changed_config_starts_over_instead_of_resuming(data, tmp_path, caplog):
    killed_after_first_checkpoint(config(epochs=30), data, tmp_path)
    summary = fit(tmp_path, config(epochs=3, lr=0.001), data=data)
    assert "resuming" not in caplog.text and summary["epochs_run"] == 3
    assert list(tsv(tmp_path, "val/loss").step) == [1, 2, 3]


def test_early_stopping_on_validation(data, tmp_path):
    cfg = config(epochs=6, scheduler="none", warmup_epochs=0, early_stopping_patience=2)
    # lr 0, which params.yaml refuses (train.lr > 0), so that the weights stand still
    cfg = dataclasses.replace(cfg, train=cfg.train.model_copy(update={"lr": 0.0}))
    summary = fit(tmp_path, cfg, data=data)
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 1


def test_frozen_backbone_then_fine_tuning(data, tmp_path):
    torch.manual_seed(DEFAULTS["ensemble"]["seeds"][0])  # fit() seeds the same way before building
    start = train.models.build("resnet18", num_classes=7, image_size=32, settings={},
                                  head=DEFAULTS["models"]["resnet18"]["head"]).state_dict()
    fit(tmp_path / "frozen", config("resnet18", epochs=1, freeze=True), data=data)
    frozen, _ = modelfile.load(tmp_path / "frozen/model.pt")
    state = frozen.state_dict()
    backbone = [k for k in state if k.startswith("backbone.")]
    assert all(torch.equal(state[k], start[k]) for k in backbone)  # weights and BatchNorm statistics
    assert not all(torch.equal(state[k], start[k]) for k in state if k.startswith("head."))

    fit(tmp_path / "tuned", config("resnet18", epochs=2, freeze=True, unfreeze_after_epochs=1), data=data)
    tuned = torch.load(tmp_path / "tuned/checkpoints/last.pt", weights_only=True)["model"]
    assert not all(torch.equal(tuned[k], start[k]) for k in backbone)


def test_freezing_a_model_without_pretrained_backbone_is_refused(data, tmp_path):
    with pytest.raises(PipelineError, match="train.freeze needs a pretrained backbone; simple_cnn has none"):
        fit(tmp_path, config(freeze=True), data=data)


def test_focal_loss_and_class_weights():
    torch.manual_seed(0)
    logits, target = torch.randn(20, 7), torch.randint(0, 7, (20,))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert losses.FocalLoss(0.0, None, 0.0)(logits, target) == pytest.approx(ce.item(), rel=1e-5)
    assert losses.FocalLoss(2.0, None, 0.0)(logits, target) < ce
    smoothed = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    assert losses.FocalLoss(0.0, None, 0.1)(logits, target) == pytest.approx(smoothed.item(), rel=1e-5)
    weights = losses.class_weights(np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 6]), 7)
    assert weights[0].item() == pytest.approx(10 / (7 * 3)) and weights[1].item() == pytest.approx(10 / 7)
    with pytest.raises(PipelineError, match=r"class\(es\) df have no training image"):
        losses.class_weights(np.array([0, 1, 2, 4, 5, 6]), 7)


def test_schedules():
    def trajectory(kind, epochs=4, steps=5, warmup=1, scores=None):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = Schedule(optimizer, kind, 1.0, epochs, steps, warmup)
        rates = []
        for epoch in range(epochs):
            for _ in range(steps):
                rates.append(schedule.current())
                optimizer.step()
                schedule.batch_end()
            schedule.epoch_end(scores[epoch] if scores else 0.0)
        return rates

    cosine = trajectory("cosine")
    assert cosine[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])  # warm-up
    assert cosine[5] == pytest.approx(1.0) and cosine[-1] < 0.02
    assert all(a >= b for a, b in zip(cosine[5:], cosine[6:]))
    one = trajectory("onecycle")
    assert max(one) == pytest.approx(1.0) and one[0] < 0.1 and one[-1] < 1e-3
    # no warm-up, or a run of a batch or two (a tiny train split), used to divide by zero
    for epochs, steps, warmup in [(4, 5, 0), (1, 3, 1), (1, 2, 1), (1, 1, 1), (2, 1, 0)]:
        rates = trajectory("onecycle", epochs=epochs, steps=steps, warmup=warmup)
        assert len(rates) == epochs * steps and all(0 < rate <= 1.0 for rate in rates)
    assert trajectory("onecycle", warmup=0)[-1] < 1e-3
    plateau = trajectory("plateau", epochs=5, warmup=0, scores=[0.5, 0.4, 0.4, 0.6, 0.6])
    assert plateau[:15] == [1.0] * 15 and plateau[15:20] == [0.5] * 5
    assert trajectory("none", warmup=0) == [1.0] * 20


@pytest.mark.parametrize("sampler, share", [("balanced", 0.5), ("sqrt", 0.25), ("shuffle", 0.1)])
def test_samplers_draw_classes_in_the_stated_shares(sampler, share):
    labels = np.array([0] * 90 + [1] * 10)
    images = np.zeros((100, 8, 8, 3), dtype=np.uint8)
    loader = ArrayLoader(images, labels, batch_size=100, mean=(0, 0, 0), std=(1, 1, 1), device=torch.device("cpu"),
                         weights=train.sampling_weights(labels, sampler), shuffle=True, seed=1)
    drawn = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        drawn.append(next(iter(loader))[1].numpy())
    assert abs((np.concatenate(drawn) == 1).mean() - share) < 0.04  # sqrt: sqrt(10) / (sqrt(90) + sqrt(10))
    assert math.isclose(len(loader), 1)


def test_strong_augmentation_is_seeded_in_range_and_more_than_flips():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 24, 24, 3), dtype=np.uint8)
    labels = np.arange(16) % 7

    def first_batch(augment, seed=3):
        loader = ArrayLoader(images, labels, batch_size=16, mean=(0, 0, 0), std=(1, 1, 1),
                             device=torch.device("cpu"), augment=augment, seed=seed)
        return next(iter(loader))[0]

    strong = first_batch("strong")
    assert strong.shape == (16, 3, 24, 24) and strong.min() >= 0 and strong.max() <= 255
    torch.testing.assert_close(strong, first_batch("strong"), rtol=0, atol=0)  # same seed, same batch
    assert not torch.equal(strong, first_batch("strong", seed=4))
    flips = first_batch("flips")
    # a flip only permutes pixels; rotation by any angle, zoom and colour jitter change the values
    assert not torch.equal(strong.flatten(1).sort(1).values, flips.flatten(1).sort(1).values)
    assert torch.equal(flips.flatten(1).sort(1).values,
                       first_batch("none").flatten(1).sort(1).values)


def test_the_moving_average_is_what_gets_validated_and_saved(data, tmp_path):
    # one epoch: the kept epoch is the last one, whose average the checkpoint holds
    fit(tmp_path, config(epochs=1, ema=0.5, early_stopping_patience=0, select="log_loss"), data=data)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    checkpoint = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k.startswith("module.")}
    raw = checkpoint["model"]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["training"]["epoch"] == 1
    assert not all(torch.equal(raw[k], saved[k]) for k in raw)  # not the raw weights...
    assert all(torch.equal(averaged[k], saved[k]) for k in saved)  # ...but their average


@pytest.mark.parametrize("select, column, better", [("macro_auc", "macro_auc", max), ("log_loss", "loss", min),
                                                    ("balanced_accuracy", "balanced_accuracy", max)])
def test_the_best_epoch_is_the_best_by_the_chosen_criterion(data, tmp_path, select, column, better):
    summary = fit(tmp_path, config(epochs=4, lr=0.01, scheduler="none", warmup_epochs=0, select=select,
                                   early_stopping_patience=0), data=data)
    curve = tsv(tmp_path, f"val/{column}")
    values = list(curve[column])
    assert summary["best_epoch"] == int(curve["step"][values.index(better(values))])


def test_precision_choice_and_a_bf16_run_on_cpu(data, tmp_path):
    cpu = torch.device("cpu")
    assert amp_dtype("fp32", cpu) is None
    assert amp_dtype("bf16", cpu) == torch.bfloat16 and amp_dtype("fp16", cpu) == torch.float16
    assert amp_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_bf16() else None)
    summary = fit(tmp_path, config(epochs=2, precision="bf16", scheduler="none", warmup_epochs=0), data=data)
    assert summary["precision"] == "bfloat16"
    loss = tsv(tmp_path, "train/loss")["loss"]
    assert loss.iloc[-1] < loss.iloc[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_the_prefetching_loader_gives_the_loaders_own_batches(device):
    # One batch ahead (on a second CUDA stream where there is one): the same batches, in
    # the same order, with the augmentation drawn the same, epoch after epoch.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 24, 24, 3), dtype=np.uint8)
    labels, patient = np.arange(37) % 7, rng.normal(size=(37, 4)).astype(np.float32)

    def epochs(prefetch):
        loader = ArrayLoader(images, labels, batch_size=8, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
                             device=torch.device(device), augment="strong", seed=5, shuffle=True,
                             patient=patient, prefetch=prefetch)
        out = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            out.append([[tensor.cpu() for tensor in batch] for batch in loader])
        return out

    plain, ahead = epochs(False), epochs(True)
    assert [len(epoch) for epoch in ahead] == [5, 5]
    for one, other in zip(plain, ahead):
        for batch, same in zip(one, other, strict=True):
            for tensor, twin in zip(batch, same, strict=True):
                torch.testing.assert_close(tensor, twin, rtol=0, atol=0)
    assert not torch.equal(plain[0][0][0], plain[1][0][0])  # the epochs differ

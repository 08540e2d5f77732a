"""Balancing the train split: counts, only train, reproducible to the byte."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skinlesion import CLASSES, PipelineError
from skinlesion.data import balance, metadata, split
from skinlesion.data.augmentation import augment, build
from skinlesion.params import Augment

AUGMENT = Augment(rotate=180, scale=0.1, shift=0.05, hflip=True, vflip=True, brightness=0.15, contrast=0.15, hue=5,
                  saturation=10)


@pytest.fixture()
def train(synthetic_zips) -> pd.DataFrame:
    frame = metadata.read(synthetic_zips / "HAM10000_metadata.csv")
    return split.split(frame, 0.15, 0.15, seed=0)["train"]


def test_threshold_downsamples_big_classes_and_fills_small_ones(train):
    target = 10
    planned = balance.plan(train, "threshold", target, seed=0)
    assert (planned.dx.value_counts() == target).all() and set(planned.dx) == set(CLASSES)
    assert set(planned.image_id) <= set(train.image_id)  # nothing from outside the train split
    for dx in CLASSES:
        have = (train.dx == dx).sum()
        rows = planned[planned.dx == dx]
        if have >= target:
            assert rows.augmented.sum() == 0 and rows.image_id.is_unique
            # distinct lesions come first when downsampling
            assert rows.lesion_id.nunique() == min(target, train[train.dx == dx].lesion_id.nunique())
        else:
            assert (rows.augmented == 0).sum() == have  # every original kept
            copies = rows[rows.augmented == 1]
            assert len(copies) == target - have
            # copies spread over the originals: none gets two before all have one
            assert copies.groupby("image_id").size().max() - copies.groupby("image_id").size().min() <= 1


def test_none_keeps_train_as_it_is(train):
    planned = balance.plan(train, "none", 500, seed=0)
    assert sorted(planned.image_id) == sorted(train.image_id) and planned.augmented.sum() == 0


def test_plan_and_render_are_reproducible(train, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(train), 24, 24, 3), dtype=np.uint8)
    rows = np.arange(len(train))
    lookup = dict(zip(train.image_id, rows))
    runs = []
    for _ in range(2):
        planned = balance.plan(train, "threshold", 10, seed=3)
        runs.append((planned, balance.render(planned, images, planned.image_id.map(lookup).to_numpy(), AUGMENT, 3)))
    assert runs[0][0].equals(runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    planned, rendered = runs[0]
    augmented = planned.index[planned.augmented == 1]
    originals = images[planned.image_id.map(lookup).to_numpy()]
    assert not np.array_equal(rendered[augmented], originals[augmented])  # copies really are augmented
    kept = planned.index[planned.augmented == 0]
    assert np.array_equal(rendered[kept], originals[kept])  # originals untouched
    other = balance.plan(train, "threshold", 10, seed=4)
    assert not other.equals(planned)


def test_augmenting_one_image_does_not_depend_on_order():
    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    pipeline = build(AUGMENT)
    first = augment(pipeline, image, 0, "ISIC_1", 1)
    augment(pipeline, image, 0, "ISIC_2", 1)
    assert np.array_equal(first, augment(pipeline, image, 0, "ISIC_1", 1))
    assert not np.array_equal(first, augment(pipeline, image, 0, "ISIC_1", 2))


def test_empty_class_in_train_is_an_error(train):
    with pytest.raises(PipelineError, match="no image of class\\(es\\) vasc"):
        balance.plan(train[train.dx != "vasc"], "threshold", 10, seed=0)

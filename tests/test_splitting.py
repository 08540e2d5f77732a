"""The split: grouped by lesion, stratified by diagnosis, reproducible."""

from __future__ import annotations

import pandas as pd
import pytest

from skinlesion import CLASSES, PipelineError
from skinlesion.data import metadata, split


@pytest.fixture()
def frame(synthetic_zips) -> pd.DataFrame:
    return metadata.read(synthetic_zips / "HAM10000_metadata.csv")


def test_no_lesion_on_two_sides_and_every_image_placed_once(frame):
    manifests = split.split(frame, 0.15, 0.15, seed=1)
    assert split.shared_lesions(manifests) == {"train-val": 0, "train-test": 0, "val-test": 0}
    placed = pd.concat(manifests.values())
    assert sorted(placed.image_id) == sorted(frame.image_id)
    # Some lesions have several images: all of them follow their lesion.
    multi = frame.lesion_id[frame.lesion_id.duplicated()].iloc[0]
    sides = [name for name, m in manifests.items() if multi in set(m.lesion_id)]
    assert len(sides) == 1 and len(placed[placed.lesion_id == multi]) == (frame.lesion_id == multi).sum()


def test_every_class_in_every_split_with_labels_in_class_order(frame):
    for name, manifest in split.split(frame, 0.15, 0.15, seed=2).items():
        assert set(manifest.dx) == set(CLASSES), name
        assert (manifest.label == manifest.dx.map(CLASSES.index)).all()
        assert list(manifest.image_id) == sorted(manifest.image_id)


def test_fractions_are_of_lesions(frame):
    manifests = split.split(frame, 0.2, 0.3, seed=0)
    lesions = frame.lesion_id.nunique()
    assert manifests["test"].lesion_id.nunique() == round(0.3 * lesions)
    assert manifests["val"].lesion_id.nunique() == round(0.2 * lesions)


def test_same_seed_same_split_other_seed_other_split(frame):
    a, b = split.split(frame, 0.15, 0.15, seed=7), split.split(frame, 0.15, 0.15, seed=7)
    c = split.split(frame, 0.15, 0.15, seed=8)
    assert all(a[name].equals(b[name]) for name in split.SPLITS)
    assert not a["test"].equals(c["test"])


def test_leak_check_catches_a_shared_lesion(frame):
    manifests = split.split(frame, 0.15, 0.15, seed=1)
    manifests["test"] = pd.concat([manifests["test"], manifests["train"].head(1)])
    with pytest.raises(AssertionError, match="lesions shared between splits"):
        split.check_disjoint(manifests, total=len(frame) + 1)


def test_class_with_too_few_lesions(frame):
    rare = frame[frame.dx == "df"].lesion_id.unique()[:-2]
    with pytest.raises(PipelineError, match=r"fewer than 3 lesions cannot be split three ways: df \(2\)"):
        split.split(frame[~frame.lesion_id.isin(rare)], 0.15, 0.15, seed=0)


def test_the_leaky_image_split_shares_lesions_and_says_how_many(frame):
    honest = split.split(frame, 0.15, 0.15, seed=0)
    leaky = split.split(frame, 0.15, 0.15, seed=0, group_by="image")
    assert split.leaking_lesions(honest) == 0 and set(split.shared_lesions(honest).values()) == {0}
    assert split.leaking_lesions(leaky) > 0 and sum(split.shared_lesions(leaky).values()) > 0
    assert sum(len(m) for m in leaky.values()) == len(frame)

"""The working-resolution cache: decoded once, squashed to a square, masks alongside."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion import PipelineError, params
from skinlesion.data import download, prepare
from tests.conftest import group


@pytest.fixture(scope="module")
def raw(synthetic_zips, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    download.download(group("download", source="local", path=str(synthetic_zips), retries=0, max_unpacked_gb=1),
                     root / "raw", root / "cache")
    return root / "raw"


def test_arrays_match_the_metadata_order_and_size(raw, tmp_path):
    summary = prepare.prepare(raw, tmp_path / "prepared", 40)
    loaded = prepare.Prepared(tmp_path / "prepared")
    frame = pd.read_csv(raw / "metadata.csv")
    assert summary == {"images": len(frame), "image_size": 40, "masks": len(frame)}
    assert loaded.images.shape == (len(frame), 40, 40, 3) and loaded.images.dtype == np.uint8
    assert loaded.masks.shape == (len(frame), 40, 40) and set(np.unique(loaded.masks)) == {0, 1}
    assert list(loaded.index.image_id) == list(frame.image_id)
    row = 5
    expected = np.asarray(Image.open(raw / "images" / f"{frame.image_id[row]}.jpg").convert("RGB")
                          .resize((40, 40), Image.Resampling.BICUBIC))
    assert np.abs(loaded.images[row].astype(int) - expected).mean() < 3
    # The synthetic lesion sits in the middle: the mask marks the centre, not the corners.
    assert loaded.masks[:, 20, 20].mean() > 0.9 and loaded.masks[:, 0, 0].mean() < 0.1


def test_same_input_same_bytes(raw, tmp_path):
    prepare.prepare(raw, tmp_path / "a", 24)
    prepare.prepare(raw, tmp_path / "b", 24)
    for name in ("images.npy", "masks.npy", "index.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("size, message", [
    (8, r"prepare.image_size is 8; expected a whole number in \[16, 1024\]"),
    (2000, r"prepare.image_size is 2000; expected a whole number in \[16, 1024\]"),
    (64.5, r"prepare.image_size is 64.5 \(float\); expected a whole number"),
    ("128", r"prepare.image_size is '128' \(str\); expected a whole number"),
    (True, r"prepare.image_size is True \(bool\); expected a whole number"),
])
def test_bad_image_size_is_named_before_anything_is_written(size, message):
    with pytest.raises(PipelineError, match=message):
        params.check(params.schema_at("prepare"), {"image_size": size}, "prepare")


def test_unknown_image_id_lookup(raw, tmp_path):
    prepare.prepare(raw, tmp_path / "p", 16)
    with pytest.raises(PipelineError, match="ISIC_0000000 is not in the prepared data"):
        prepare.Prepared(tmp_path / "p").rows(["ISIC_0000000"])

"""The prediction command on what a clinic's shared drive holds: a folder in HAM10000
layout (masks are not inputs), 16-bit scans, names with spaces and non-ASCII or
non-UTF-8 letters, links to files and folders, a link loop, broken links, empty
and unreadable files, hidden and system files."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import run_command as run
from tests.conftest import unprivileged

pytestmark = pytest.mark.slow
PREDICT = [sys.executable, "-m", "skinlesion.predict"]


def test_masks_of_a_ham10000_folder_are_skipped_unless_asked_for(kit, tmp_path):
    result = run([*PREDICT, kit.model, kit.ham, "-o", tmp_path / "out.csv"], tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "out.csv")
    assert len(table) == 7 and not table.image_id.str.endswith("_segmentation").any()
    assert "skipped 7 lesion mask(s) (*_segmentation.png; --include-masks classifies them too), 1 table(s)" \
           in result.stderr
    both = run([*PREDICT, kit.model, kit.ham, "-o", tmp_path / "both.csv", "--include-masks"], tmp_path)
    assert both.returncode == 0 and len(pd.read_csv(tmp_path / "both.csv")) == 14


def test_a_sixteen_bit_scan_is_classified_like_its_8_bit_grey_copy(kit, tmp_path):
    grey = np.asarray(Image.open(kit.image).convert("L"))
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(grey).save(scans / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(scans / "grey16.png")
    Image.fromarray(np.full_like(grey, 255)).save(scans / "white.png")
    result = run([*PREDICT, kit.model, scans, "-o", tmp_path / "out.csv"], tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "out.csv").set_index("image_id")
    columns = [c for c in table.columns if c.startswith("p_")]
    assert np.array_equal(table.loc["grey16", columns], table.loc["grey8", columns])
    assert not np.array_equal(table.loc["grey16", columns], table.loc["white", columns])


def test_a_folder_from_a_shared_drive(kit, tmp_path):
    good = kit.image.read_bytes()
    drive = tmp_path / "Befunde März"
    (drive / "Patient Müller").mkdir(parents=True)
    (drive / "Patient Müller/Läsion 1.jpg").write_bytes(good)
    (drive / "with space.jpg").write_bytes(good)
    with open(os.fsencode(drive) + b"/latin1 l\xe4sion.jpg", "wb") as handle:  # a name that is not UTF-8
        handle.write(good)
    outside = tmp_path / "elsewhere"
    (outside / "folder").mkdir(parents=True)
    (outside / "linked.jpg").write_bytes(good)
    (outside / "folder/deep.jpg").write_bytes(good)
    (drive / "link to file.jpg").symlink_to(outside / "linked.jpg")
    (drive / "link to folder").symlink_to(outside / "folder")
    (drive / "loop").symlink_to(drive)
    (drive / "broken link.jpg").symlink_to(tmp_path / "gone.jpg")
    (drive / "empty.jpg").write_bytes(b"")
    (drive / "unreadable.jpg").write_bytes(good)
    (drive / "unreadable.jpg").chmod(0)
    for junk in (".DS_Store", "._Läsion 1.jpg", "Thumbs.db"):
        (drive / junk).write_bytes(b"\0junk")
    (drive / "ISIC_0024306_segmentation.png").write_bytes(
        (kit.ham / "HAM10000_segmentations_lesion_tschandl/ISIC_0024306_segmentation.png").read_bytes())

    result = run(unprivileged([*PREDICT, kit.model, drive, "-o", drive / "predictions.csv"]), tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert errors == [
        f"error: {drive.name}/broken link.jpg cannot be read: no such file (a broken link, or removed while this ran)",
        f"error: {drive.name}/empty.jpg is empty (0 bytes), not an image; copy it again",
        f"error: {drive.name}/unreadable.jpg cannot be read: permission denied; give this user read access to it",
    ]
    assert "skipped 1 lesion mask(s)" in result.stderr and "3 hidden or system file(s)" in result.stderr
    table = pd.read_csv(drive / "predictions.csv", encoding="utf-8")
    assert sorted(table.file) == sorted(f"{drive.name}/{name}" for name in (
        "Patient Müller/Läsion 1.jpg", "with space.jpg", "latin1 l\\xe4sion.jpg", "link to file.jpg",
        "link to folder/deep.jpg"))
    assert table.drop(columns=["file", "image_id"]).nunique().max() == 1  # one image, five names

    # A second run into the same folder skips its own earlier output.
    (drive / "unreadable.jpg").unlink()
    (drive / "empty.jpg").unlink()
    (drive / "broken link.jpg").unlink()
    again = run([*PREDICT, kit.model, drive, "-o", drive / "predictions.csv"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(pd.read_csv(drive / "predictions.csv")) == 5


def test_an_image_inside_a_zip_that_is_damaged(kit, tmp_path):
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.jpg", kit.image.read_bytes())
        archive.writestr("b.jpg", kit.image.read_bytes())
    data = bytearray(buffer.getvalue())
    data[60] ^= 0xFF  # inside a.jpg's compressed bytes
    (tmp_path / "upload.zip").write_bytes(bytes(data))
    result = run([*PREDICT, kit.model, tmp_path / "upload.zip", "-o", tmp_path / "out.csv"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "upload.zip:a.jpg cannot be read from its zip" in result.stderr
    assert list(pd.read_csv(tmp_path / "out.csv").file) == ["upload.zip:b.jpg"]

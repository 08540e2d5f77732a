"""One decoding policy per image mode, the same on every path: a file the download
stage keeps is prepared with exactly the pixels the prediction command sees, and a
file one path refuses, every path refuses, for the same reason."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from skinlesion import PipelineError, synthetic
from skinlesion.data import archives, images, prepare
from skinlesion.data import download as sources
from tests.conftest import group

SIZE = 32


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def rotated_jpeg(rgb: Image.Image) -> bytes:
    """``rgb`` stored sideways, with EXIF orientation 6 (turn 90 degrees clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(rgb.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def with_alpha(rgb: Image.Image, mode: str) -> Image.Image:
    image = rgb.convert(mode)
    alpha = np.full(rgb.size[::-1], 255, np.uint8)
    alpha[:, : rgb.width // 2] = 64  # the left half mostly transparent
    image.putalpha(Image.fromarray(alpha))
    return image


def transparent_palette(rgb: Image.Image) -> bytes:
    image = rgb.convert("P")
    image.info["transparency"] = 0
    return encode(image, "PNG", transparency=0)


# How each mode is stored: the format that can hold it. The file keeps the name
# ISIC_....jpg in the source (Pillow reads a file by its content, not its name).
STORED = {
    "RGB": lambda rgb: encode(rgb, "JPEG", quality=95),
    "L": lambda rgb: encode(rgb.convert("L"), "JPEG", quality=95),
    "CMYK": lambda rgb: encode(rgb.convert("CMYK"), "JPEG", quality=95),
    "P": lambda rgb: encode(rgb.convert("P"), "PNG"),
    "P with transparency": transparent_palette,
    "RGBA": lambda rgb: encode(with_alpha(rgb, "RGBA"), "PNG"),
    "LA": lambda rgb: encode(with_alpha(rgb, "LA"), "PNG"),
    "I;16": lambda rgb: encode(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"),
    "I": lambda rgb: encode(rgb.convert("I"), "TIFF"),
    "F": lambda rgb: encode(rgb.convert("F"), "TIFF"),
    "1": lambda rgb: encode(rgb.convert("1"), "PNG"),
    "EXIF orientation": rotated_jpeg,
    "empty": lambda rgb: b"",
    "truncated": lambda rgb: encode(rgb, "JPEG")[:300],
    "not an image": lambda rgb: b"<html>404</html>",
}
REFUSED = {"I", "F", "1", "empty", "truncated", "not an image"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoding")
    synthetic.make_dataset(folder, lesions_per_class=1, max_images_per_lesion=1, layout="folder")
    return folder


def through_the_pipeline(source, tmp_path) -> tuple[np.ndarray | None, str | None]:
    """The download stage's check, then prepare: the victim's prepared pixels, or the reason it was refused."""
    params = group("download", source="local", path=str(source), retries=0, max_unpacked_gb=1)
    try:
        sources.download(params, tmp_path / "raw", tmp_path / "cache")
        prepare.prepare(tmp_path / "raw", tmp_path / "prepared", SIZE)
    except PipelineError as error:
        return None, str(error)
    loaded = prepare.Prepared(tmp_path / "prepared")
    return loaded.images[loaded.row["ISIC_0024306"]], None


def through_the_prediction_command(path) -> tuple[np.ndarray | None, str | None]:
    """What the prediction command (and --score) decode: pixels, or the error line."""
    collector = archives.Collector(path.parent, 2**30)
    ok, pixels, errors = images.decode_all(collector.collect([path]), SIZE)
    return (pixels[0], None) if ok else (None, errors[0])


@pytest.mark.parametrize("mode", list(STORED))
def test_every_path_decodes_a_mode_alike(source, tmp_path, mode):
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    victim = copy / "HAM10000_images_part_1" / "ISIC_0024306.jpg"
    victim.write_bytes(STORED[mode](Image.open(victim).convert("RGB")))

    prepared, refused_by_pipeline = through_the_pipeline(copy, tmp_path)
    predicted, refused_by_command = through_the_prediction_command(victim)

    if mode in REFUSED:
        assert prepared is None and predicted is None
        reason = refused_by_command.split("ISIC_0024306.jpg ", 1)[1]
        assert f"ISIC_0024306.jpg {reason}" in refused_by_pipeline
        if mode in {"I", "F", "1"}:
            assert reason.startswith(f"has mode {mode}:")
    else:
        assert refused_by_pipeline is None and refused_by_command is None
        assert prepared.shape == (SIZE, SIZE, 3) and np.array_equal(prepared, predicted)


@pytest.fixture(scope="module")
def photo(source) -> Image.Image:
    return Image.open(source / "HAM10000_images_part_1" / "ISIC_0024306.jpg").convert("RGB")


def test_sixteen_bit_grey_is_scaled_not_read_as_white(photo):
    grey = np.asarray(photo.convert("L"))
    decoded = np.asarray(images.decode(STORED["I;16"](photo)))
    assert np.array_equal(decoded[..., 0], grey) and np.array_equal(decoded[..., 2], grey)
    assert decoded.mean() < 250


def test_alpha_is_composited_on_white_and_exif_orientation_applied(photo):
    decoded = np.asarray(images.decode(STORED["RGBA"](photo))).astype(int)
    original = np.asarray(photo).astype(int)
    right, left = slice(photo.width // 2, None), slice(None, photo.width // 2)
    assert np.array_equal(decoded[:, right], original[:, right])  # opaque: unchanged
    expected_left = (original[:, left] * 64 + 255 * (255 - 64)) / 255
    assert np.abs(decoded[:, left] - expected_left).max() <= 1
    upright = np.asarray(images.decode(STORED["EXIF orientation"](photo))).astype(int)
    assert upright.shape == original.shape and np.abs(upright - original).mean() < 4


def test_a_refusal_names_the_mode_and_the_fix():
    with pytest.raises(images.Unusable, match="has mode F: floating-point .*; save it as an 8-bit RGB JPEG or PNG"):
        images.decode(encode(Image.new("F", (8, 8)), "TIFF"))

"""A tiny synthetic data set in HAM10000 layout, for tests and benchmarks.

Each class draws its lesion in its own colour and shape on noisy skin, so a model
can learn it in a few steps; several lesions have more than one image, and every
image has a mask, as in the real set.
"""

from __future__ import annotations

import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from skinlesion import CLASSES, METADATA_COLUMNS

COLOURS = {
    "akiec": (200, 60, 60), "bcc": (230, 160, 170), "bkl": (150, 110, 60), "df": (120, 80, 90),
    "mel": (40, 25, 20), "nv": (110, 70, 40), "vasc": (200, 30, 90),
}


def _draw(rng: np.random.Generator, dx: str, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    width, height = size
    skin = np.array([225, 180, 150]) + rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(skin, 0, 255).astype(np.uint8))
    mask = Image.new("L", size, 0)
    index = CLASSES.index(dx)
    rx = width * (0.18 + 0.03 * index) * rng.uniform(0.85, 1.15)
    ry = height * (0.30 - 0.02 * index) * rng.uniform(0.85, 1.15)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    box = (cx - rx, cy - ry, cx + rx, cy + ry)
    colour = tuple(int(c + rng.integers(-15, 16)) for c in COLOURS[dx])
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return image, mask


def make_dataset(
    folder: str | Path,
    *,
    lesions_per_class: dict[str, int] | int | None = None,
    max_images_per_lesion: int = 3,
    size: tuple[int, int] = (64, 48),
    layout: str = "folder",
    seed: int = 0,
) -> pd.DataFrame:
    """Write a synthetic HAM10000 copy into ``folder`` and return its metadata.

    ``layout="folder"`` writes loose files (images in two part folders, as the
    official set ships them); ``"zips"`` writes the images and masks as zip archives
    beside the metadata CSV, like ``../shared/ham10000``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if lesions_per_class is None:
        lesions_per_class = {name: 6 for name in CLASSES} | {"nv": 14}
    elif isinstance(lesions_per_class, int):
        lesions_per_class = {name: lesions_per_class for name in CLASSES}
    rows, files = [], []
    image_number, lesion_number = 24306, 0
    for dx in CLASSES:
        for _ in range(lesions_per_class[dx]):
            lesion_number += 1
            lesion_id = f"HAM_{lesion_number:07d}"
            sex = str(rng.choice(["male", "female"]))
            site = str(rng.choice(["back", "face", "trunk", "lower extremity"]))
            age = f"{rng.integers(2, 17) * 5}.0"
            for _ in range(int(rng.integers(1, max_images_per_lesion + 1))):
                image_id = f"ISIC_{image_number:07d}"
                image_number += 1
                rows.append({"lesion_id": lesion_id, "image_id": image_id, "dx": dx,
                             "dx_type": "histo", "age": age, "sex": sex, "localization": site})
                files.append((image_id, *_draw(rng, dx, size)))
    frame = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    frame.to_csv(folder / "HAM10000_metadata.csv", index=False)
    _write_files(folder, files, layout)
    return frame


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = BytesIO()
    image.save(buffer, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _write_files(folder: Path, files: list, layout: str) -> None:
    """Images and masks as the official set ships them (``folder``) or zipped (``zips``)."""
    if layout == "folder":
        half = len(files) // 2
        for number, (image_id, image, mask) in enumerate(files):
            part = folder / f"HAM10000_images_part_{1 if number < half else 2}"
            part.mkdir(exist_ok=True)
            (part / f"{image_id}.jpg").write_bytes(_encode(image, "JPEG"))
            masks = folder / "HAM10000_segmentations_lesion_tschandl"
            masks.mkdir(exist_ok=True)
            (masks / f"{image_id}_segmentation.png").write_bytes(_encode(mask, "PNG"))
    elif layout == "zips":
        with zipfile.ZipFile(folder / "HAM10000_images.zip", "w") as images, \
                zipfile.ZipFile(folder / "HAM10000_segmentations.zip", "w") as masks:
            for image_id, image, mask in files:
                images.writestr(f"{image_id}.jpg", _encode(image, "JPEG"))
                masks.writestr(f"{image_id}_segmentation.png", _encode(mask, "PNG"))
    else:
        raise ValueError(f"layout must be 'folder' or 'zips', not {layout!r}")

"""Decode and resize every image once, to the working resolution.

Images are decoded by ``skinlesion.data.images`` (the one policy for every path).
Training reads ``images.npy`` (uint8, N x S x S x 3, memory-mapped) instead of
decoding JPEGs every epoch; decoding a 600x450 JPEG costs more than a small
model's forward pass on CPU. Masks go to ``masks.npy`` (0/1) for the explain stage.
"""

from __future__ import annotations

import logging
import os
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from skinlesion import CLASSES, PipelineError
from skinlesion.data import metadata
from skinlesion.data.images import Unusable, load_image, read
from skinlesion.files import atomic_dir, reserve, write_csv
from skinlesion.progress import bar, threads

log = logging.getLogger(__name__)


def load_mask(path: Path, size: int) -> np.ndarray:
    with Image.open(BytesIO(read(path))) as mask:
        grey = mask.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(grey) >= 128).astype(np.uint8)


def prepare(raw: Path, out: Path, size) -> dict:
    raw = Path(raw)
    frame = metadata.read(raw / "metadata.csv")
    count = len(frame)
    with atomic_dir(out) as building:
        images = np.lib.format.open_memmap(building / "images.npy", "w+", np.uint8, (count, size, size, 3))
        masks = np.lib.format.open_memmap(building / "masks.npy", "w+", np.uint8, (count, size, size))
        has_mask = np.zeros(count, dtype=bool)
        # Claimed now: a disk that fills up while the memory maps are written would
        # kill the process (SIGBUS) instead of raising an error that can be reported.
        reserve(building / "images.npy")
        reserve(building / "masks.npy")

        def decode(image_id: str) -> tuple[np.ndarray, np.ndarray | None]:
            image_path, mask_path = raw / "images" / f"{image_id}.jpg", raw / "masks" / f"{image_id}.png"
            try:
                image = load_image(image_path, size)
            except Unusable as error:
                raise PipelineError(f"{image_path} {error}") from None
            if not mask_path.exists():
                return image, None
            try:
                return image, load_mask(mask_path, size)
            except Unusable as error:
                raise PipelineError(f"{mask_path} {error}") from None
            except (OSError, ValueError) as error:
                raise PipelineError(f"{mask_path} is not a readable image ({error}); rerun `dvc repro download`") \
                    from None

        # Threads decode (PIL releases the GIL); this thread alone writes the arrays.
        with threads(os.cpu_count() or 1) as pool:
            decoded = pool.map(decode, frame["image_id"])
            for row, (image, mask) in enumerate(bar(decoded, total=count, desc=f"resize to {size}px", unit="img")):
                images[row] = image
                if mask is not None:
                    masks[row] = mask
                    has_mask[row] = True
        images.flush()
        masks.flush()
        del images, masks  # close the memory maps before the folder is renamed into place
        index = frame.loc[:, ["image_id", "lesion_id", "dx"]].copy()
        index["label"] = index["dx"].map(CLASSES.index)
        index["has_mask"] = has_mask.astype(int)
        write_csv(building / "index.csv", index)
    log.info("prepared %d images at %dx%d, %d with masks", count, size, size, int(has_mask.sum()))
    return {"images": count, "image_size": size, "masks": int(has_mask.sum())}


class Prepared:
    """The prepared arrays, memory-mapped, with a lookup from image_id to row."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        import pandas as pd

        self.index = pd.read_csv(folder / "index.csv", dtype={"image_id": str, "lesion_id": str})
        self.images = np.load(folder / "images.npy", mmap_mode="r")
        self.masks = np.load(folder / "masks.npy", mmap_mode="r")
        self.row = {image_id: row for row, image_id in enumerate(self.index["image_id"])}

    def rows(self, image_ids) -> np.ndarray:
        try:
            return np.array([self.row[image_id] for image_id in image_ids], dtype=np.int64)
        except KeyError as error:
            raise PipelineError(f"image {error.args[0]} is not in the prepared data; rerun "
                                f"`dvc repro prepare`") from None

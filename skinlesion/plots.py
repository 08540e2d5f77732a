"""Pictures people would rather look at than read: class balance, augmented samples."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from skinlesion import CLASSES  # noqa: E402
from skinlesion.files import atomic_path  # noqa: E402

_PNG_METADATA = {"Software": None}  # keep PNGs byte-identical across matplotlib patch versions


def save_figure(figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, metadata=_PNG_METADATA)
    plt.close(figure)


def class_distribution(counts: dict[str, dict[str, int]], path: str | Path, title: str) -> None:
    """Grouped bars of images per class for each split, log scale, counts on the bars."""
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(counts)
    x = np.arange(len(CLASSES))
    for offset, (name, per_class) in enumerate(counts.items()):
        values = [per_class[dx] for dx in CLASSES]
        bars = axis.bar(x + (offset - (len(counts) - 1) / 2) * width, values, width, label=name)
        axis.bar_label(bars, fontsize=7, padding=1)
    axis.set_xticks(x, CLASSES)
    axis.set_yscale("log")
    axis.set_ylabel("images (log scale)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def montage(images: np.ndarray, planned: pd.DataFrame, originals: dict[str, np.ndarray], path: str | Path,
            per_class: int, tile: int = 96) -> None:
    """One row per class: an original, then augmented copies of it (or, for a class
    that was only downsampled, the originals kept)."""
    label_width = 70
    canvas = Image.new("RGB", (label_width + tile * (per_class + 1), tile * len(CLASSES)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, dx in enumerate(CLASSES):
        members = planned[planned["dx"] == dx]
        copies = members[members["augmented"] == 1]
        if len(copies):
            source = copies["image_id"].iloc[0]
            shown = [originals[source]] + [images[i] for i in copies.index[copies["image_id"] == source][:per_class]]
            shown += [images[i] for i in copies.index[copies["image_id"] != source][: per_class + 1 - len(shown)]]
            note = "original, then augmented"
        else:
            shown = [images[i] for i in members.index[: per_class + 1]]
            note = "originals kept"
        draw.text((4, row * tile + tile // 2 - 12), dx, fill="black")
        draw.text((4, row * tile + tile // 2 + 2), note.split(",")[0], fill="grey")
        for column, image in enumerate(shown):
            picture = Image.fromarray(np.asarray(image)).resize((tile - 2, tile - 2), Image.Resampling.NEAREST)
            canvas.paste(picture, (label_width + column * tile + 1, row * tile + 1))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")

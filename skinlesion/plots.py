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


def confusion_matrix_png(matrix: np.ndarray, path: str | Path, title: str) -> None:
    """Counts and row-normalised rates (recall on the diagonal), side by side."""
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for axis, values, label, fmt in ((axes[0], matrix, "images", "d"), (axes[1], rates, "share of row", ".2f")):
        shown = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)  # both panels shaded by rate
        for (i, j), value in np.ndenumerate(values):
            axis.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8,
                      color="white" if rates[i, j] > 0.5 else "black")
        axis.set_xticks(range(len(CLASSES)), CLASSES)
        axis.set_yticks(range(len(CLASSES)), CLASSES)
        axis.set_xlabel("predicted")
        axis.set_ylabel("actual")
        axis.set_title(f"{title}: {label}")
    figure.colorbar(shown, ax=axes[1], fraction=0.046)
    figure.tight_layout()
    save_figure(figure, path)


def image_grid(images: np.ndarray, captions: list[str], colours: list[str], path: str | Path,
               columns: int = 7, tile: int = 128) -> None:
    """Images in a grid, each with a caption line under it (green right, red wrong)."""
    rows = -(-len(images) // columns)
    caption = 28
    canvas = Image.new("RGB", (columns * tile, max(rows, 1) * (tile + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    for number, (image, text, colour) in enumerate(zip(images, captions, colours)):
        x, y = (number % columns) * tile, (number // columns) * (tile + caption)
        canvas.paste(Image.fromarray(np.asarray(image)).resize((tile - 4, tile - 4)), (x + 2, y + 2))
        for line, part in enumerate(text.split("\n")[:2]):
            draw.text((x + 3, y + tile + line * 12), part, fill=colour)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The heat map (jet) blended over the image, the lesion outline in white."""
    coloured = (matplotlib.colormaps["jet"](heat)[..., :3] * 255).astype(np.float32)
    blended = (0.55 * image.astype(np.float32) + 0.45 * coloured).astype(np.uint8)
    if mask is not None and mask.any():
        edge = mask.astype(bool) & ~(np.roll(mask, 1, 0).astype(bool) & np.roll(mask, -1, 0).astype(bool)
                                     & np.roll(mask, 1, 1).astype(bool) & np.roll(mask, -1, 1).astype(bool))
        blended[edge] = 255
    return blended


def curves_png(curves: dict[str, list[dict]], x: str, y: str, path: str | Path, title: str,
               diagonal: bool = False) -> None:
    figure, axis = plt.subplots(figsize=(6, 5.5))
    for name, rows in curves.items():
        axis.plot([r[x] for r in rows], [r[y] for r in rows], label=name, linewidth=1.3)
    if diagonal:
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel(x)
    axis.set_ylabel(y)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def reliability_png(curves: dict[str, list[dict]], path: str | Path, title: str) -> None:
    """Accuracy against mean confidence per bin, one line per scoring, with the accuracy's
    interval as error bars where the rows have one; the grey bars under them count the
    images per bin of the first scoring (a point over few images says little)."""
    figure, (axis, counts) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True, height_ratios=(4, 1))
    for offset, (name, rows) in enumerate(curves.items()):
        x = np.array([r["confidence"] for r in rows], dtype=float) + 0.004 * offset  # side by side, not on top
        y = np.array([r["accuracy"] for r in rows], dtype=float)
        if rows and "accuracy_low" in rows[0]:
            error = [y - np.array([r["accuracy_low"] for r in rows]), np.array([r["accuracy_high"] for r in rows]) - y]
            axis.errorbar(x, y, yerr=np.clip(error, 0, None), label=name, linewidth=1.3, marker="o", markersize=3,
                          capsize=2, elinewidth=0.8)
        else:
            axis.plot(x, y, label=name, linewidth=1.3, marker="o", markersize=3)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    first = next(iter(curves.values()), [])
    counts.bar([r["bin"] for r in first], [r["count"] for r in first], width=0.06, color="lightgrey")
    counts.set_xlabel("confidence (top-label probability)")
    counts.set_ylabel("images")
    figure.tight_layout()
    save_figure(figure, path)


def groups_png(table: pd.DataFrame, figure_name: str, path: str | Path, title: str, overall: float | None = None) -> None:
    """Horizontal bars of ``figure_name`` per patient group with their 95 % intervals
    (rows of ``skinlesion.evaluation.subgroups.table``; groups too small to report are left out)."""
    shown = table[table[figure_name].notna()].reset_index(drop=True)
    figure, axis = plt.subplots(figsize=(6.5, 0.28 * max(len(shown), 4) + 1.2))
    positions = np.arange(len(shown))[::-1]
    values = shown[figure_name].to_numpy(dtype=float)
    low = values - shown[f"{figure_name}_low"].to_numpy(dtype=float)
    high = shown[f"{figure_name}_high"].to_numpy(dtype=float) - values
    palette = {"sex": "tab:blue", "age": "tab:orange", "localization": "tab:green", "dx_type": "tab:purple"}
    axis.barh(positions, values, xerr=[low, high], color=[palette.get(g, "grey") for g in shown["group"]],
              alpha=0.8, error_kw={"linewidth": 0.8})
    axis.set_yticks(positions, [f"{g}: {v} ({n})" for g, v, n in zip(shown["group"], shown["value"], shown["images"])],
                    fontsize=7)
    if overall is not None:
        axis.axvline(overall, color="black", linestyle=":", linewidth=1)
    axis.set_xlim(0, 1)
    axis.set_xlabel(f"{figure_name.replace('_', ' ')} (95 % lesion-bootstrap interval; images in brackets)")
    axis.set_title(title)
    figure.tight_layout()
    save_figure(figure, path)


def score_histograms(scored: dict[str, dict[str, np.ndarray]], method: str | None, threshold: float | None,
                     path: str | Path) -> None:
    """Per candidate out-of-scope score, the histogram of each set's scores (the test
    split's lesions and each out-of-scope set), with the model's own threshold."""
    methods = list(next(iter(scored.values())))
    figure, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6))
    for axis, name in zip(np.atleast_1d(axes), methods):
        values = np.concatenate([scores[name] for scores in scored.values()])
        values = values[np.isfinite(values)]
        if name == "mahalanobis" and len(values) and values.min() > 0:  # heavy-tailed: on a log scale
            edges = np.geomspace(values.min(), values.max(), 41)
            axis.set_xscale("log")
        else:
            edges = np.histogram_bin_edges(values, bins=40)
        for label, scores in scored.items():
            axis.hist(scores[name], bins=edges, density=True, alpha=0.45, label=label)
        if name == method and threshold is not None:
            axis.axvline(threshold, color="black", linestyle=":", linewidth=1.2, label="threshold (validation)")
        axis.set_title(name + (" (the model's)" if name == method else ""))
        axis.set_xlabel("score (larger: further out)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)

"""What the evaluate stage writes beside its metrics: the data behind DVC's plots
(confusion, one-vs-rest ROC and precision-recall per class, reliability) and the
PNGs people look at (confusion matrix, ROC, a grid of test predictions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion import CLASSES, plots
from skinlesion.evaluation import metrics
from skinlesion.files import atomic_dir, write_csv


def write_plots(folder: Path, frame: pd.DataFrame, probabilities: np.ndarray, images: np.ndarray,
                grid_per_class: int, seed: int) -> None:
    """``frame`` holds the evaluated rows (image_id, label) in the order of
    ``probabilities`` and ``images``."""
    labels = frame["label"].to_numpy()
    predicted = probabilities.argmax(axis=1)
    with atomic_dir(folder) as out:
        write_csv(out / "confusion.csv", pd.DataFrame({
            "actual": [CLASSES[i] for i in labels], "predicted": [CLASSES[i] for i in predicted]}))
        roc, pr = metrics.roc_points(labels, probabilities), metrics.pr_points(labels, probabilities)
        for name in CLASSES:
            write_csv(out / "roc" / f"{name}.csv", pd.DataFrame(roc.get(name, []), columns=["fpr", "tpr"]))
            write_csv(out / "pr" / f"{name}.csv", pd.DataFrame(pr.get(name, []), columns=["recall", "precision"]))
        write_csv(out / "reliability.csv", pd.DataFrame(metrics.reliability(labels, probabilities),
                                                        columns=["bin", "confidence", "accuracy", "count"]))
        probabilities_frame = pd.DataFrame(probabilities.round(6), columns=[f"p_{c}" for c in CLASSES])
        write_csv(out / "predictions.csv", pd.concat(
            [frame[["image_id"]].reset_index(drop=True), probabilities_frame,
             pd.DataFrame({"actual": [CLASSES[i] for i in labels], "predicted": [CLASSES[i] for i in predicted]})],
            axis=1))
        plots.confusion_matrix_png(metrics.confusion(labels, probabilities), out / "confusion_matrix.png", "test")
        plots.curves_png(roc, "fpr", "tpr", out / "roc.png", "ROC, one class vs the rest (test)", diagonal=True)
        rng = np.random.default_rng(seed)
        chosen = []
        for index in range(len(CLASSES)):
            members = np.flatnonzero(labels == index)
            chosen.extend(sorted(rng.choice(members, min(grid_per_class, len(members)), replace=False)))
        captions = [f"true {CLASSES[labels[i]]}\npred {CLASSES[predicted[i]]} {probabilities[i].max():.2f}"
                    for i in chosen]
        colours = ["darkgreen" if labels[i] == predicted[i] else "red" for i in chosen]
        plots.image_grid(images[chosen], captions, colours, out / "test_grid.png", columns=max(grid_per_class, 1))

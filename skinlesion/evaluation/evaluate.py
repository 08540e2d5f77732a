"""The evaluate stage: a labelled set scored once, the way the model file says, with
lesion-bootstrap intervals; beside the metrics, the data behind DVC's plots (confusion,
one-vs-rest ROC and precision-recall per class, reliability before and after
calibration, the figures by patient group) and the PNGs people look at (confusion
matrix, ROC, reliability, balanced accuracy by group, a grid of test predictions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion import CLASSES, plots
from skinlesion.evaluation import calibrate, metrics, scope, subgroups
from skinlesion.evaluation.predictor import Predictor
from skinlesion.files import atomic_dir, write_csv, write_json
from skinlesion.params import Evaluate


def evaluate_split(predictor: Predictor, frame: pd.DataFrame, images: np.ndarray, settings: Evaluate, *,
                   metrics_path: Path, plots_dir: Path | None, progress: str | None = None,
                   scores_path: Path | None = None, model_digest: str = "") -> dict:
    """Score ``frame`` (image_id, lesion_id, label; ``images`` in its order) with ``predictor``
    (skinlesion.evaluation.predictor): writes the headline metrics to ``metrics_path`` and
    the details and plots under ``plots_dir``; with ``scores_path``, for a model carrying
    the Mahalanobis score, every out-of-scope candidate's scores of these images
    (``scope.save_candidates``, under ``model_digest``), which the scope stage reads."""
    how = predictor.scoring
    logits, probabilities, scores = predictor.answer(images, batch_size=settings.batch_size, progress=progress,
                                                     patient=predictor.patient_rows(frame))  # None: no metadata
    if scores_path is not None:
        distances = scores if predictor.scope_method == "mahalanobis" else None
        scope.save_candidates(scores_path, frame["image_id"], scope.candidates(logits, probabilities, distances),
                              model_digest)
    uncalibrated = calibrate.probabilities(logits, {**how, "temperature": 1.0})
    labels = frame["label"].to_numpy()
    result, details = metrics.report(labels, probabilities, frame["lesion_id"].to_numpy(), uncalibrated=uncalibrated,
                                     mel_threshold=how.get("mel_threshold"),
                                     mel_specificity=settings.mel_specificity,
                                     resamples=settings.bootstrap_resamples, seed=settings.bootstrap_seed)
    in_scope = predictor.in_scope(scores)
    if in_scope is not None:  # the share the model would answer (the rest: "not like the training data")
        result["in_scope"] = round(float(in_scope.mean()), 4) if len(in_scope) else None
    write_json(metrics_path, result, sort_keys=False)  # the headline first, as `dvc exp show` lists it
    if plots_dir is not None:
        groups = subgroups.table(frame, labels, probabilities, frame["lesion_id"].to_numpy(),
                                 resamples=settings.bootstrap_resamples, seed=settings.bootstrap_seed,
                                 mel_threshold=how.get("mel_threshold"))
        write_plots(plots_dir, frame, probabilities, images, settings.grid_per_class, settings.seed,
                    details=details, uncalibrated=uncalibrated, groups=groups,
                    overall=result["balanced_accuracy"], resamples=settings.bootstrap_resamples,
                    bootstrap_seed=settings.bootstrap_seed)
    return result


def write_plots(folder: Path, frame: pd.DataFrame, probabilities: np.ndarray, images: np.ndarray,
                grid_per_class: int, seed: int, details: dict | None = None,
                uncalibrated: np.ndarray | None = None, groups: pd.DataFrame | None = None,
                overall: float | None = None, resamples: int = 0, bootstrap_seed: int = 0) -> None:
    """``frame`` holds the evaluated rows (image_id, label, and lesion_id for the
    reliability intervals, from ``resamples`` lesion draws) in the order of
    ``probabilities`` and ``images``; ``groups``, the figures per patient group
    (``subgroups.table``), drawn beside the ``overall`` balanced accuracy."""
    labels = frame["label"].to_numpy()
    predicted = probabilities.argmax(axis=1)
    with atomic_dir(folder) as out:
        write_csv(out / "confusion.csv", pd.DataFrame({
            "actual": [CLASSES[i] for i in labels], "predicted": [CLASSES[i] for i in predicted]}))
        roc, pr = metrics.roc_points(labels, probabilities), metrics.pr_points(labels, probabilities)
        for name in CLASSES:
            write_csv(out / "roc" / f"{name}.csv", pd.DataFrame(roc.get(name, []), columns=["fpr", "tpr"]))
            write_csv(out / "pr" / f"{name}.csv", pd.DataFrame(pr.get(name, []), columns=["recall", "precision"]))
        lesions = frame["lesion_id"].to_numpy() if "lesion_id" in frame else None
        scored = {"calibrated": probabilities, **({} if uncalibrated is None else {"uncalibrated": uncalibrated})}
        reliability = {name: metrics.reliability(labels, p, lesions=lesions, resamples=resamples, seed=bootstrap_seed)
                       for name, p in scored.items()}
        intervals = lesions is not None and resamples > 0
        columns = ["bin", "confidence", "accuracy", "count"] + (["accuracy_low", "accuracy_high"] if intervals else [])
        for name, rows in reliability.items():
            write_csv(out / ("reliability.csv" if name == "calibrated" else f"reliability_{name}.csv"),
                      pd.DataFrame(rows, columns=columns))
        plots.reliability_png(reliability, out / "reliability.png",
                              "Reliability (test): accuracy against confidence, 95 % lesion-bootstrap intervals"
                              if intervals else "Reliability (test): accuracy against confidence")
        if details is not None:
            write_json(out / "details.json", details)
        if groups is not None and len(groups):
            write_csv(out / "subgroups.csv", groups)
            plots.groups_png(groups, "balanced_accuracy", out / "subgroups.png",
                             "Balanced accuracy by patient group (test)", overall=overall)
        probabilities_frame = pd.DataFrame(probabilities.round(6), columns=[f"p_{c}" for c in CLASSES])
        write_csv(out / "predictions.csv", pd.concat(
            [frame[["image_id"]].reset_index(drop=True), probabilities_frame,
             pd.DataFrame({"actual": [CLASSES[i] for i in labels], "predicted": [CLASSES[i] for i in predicted]})],
            axis=1), for_people=True)
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

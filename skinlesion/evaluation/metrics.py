"""Clinical metrics for a 7-class lesion classifier.

Balanced accuracy (mean per-class recall, the ISIC 2018 metric) is the headline:
nv is two thirds of the images, so plain accuracy rewards a model that ignores
the rare, dangerous classes. Beside it: macro/weighted F1, per-class precision,
recall, F1 and one-vs-rest ROC AUC, melanoma sensitivity at a fixed specificity,
and expected calibration error.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from skinlesion import CLASSES, PipelineError


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> list[dict]:
    """Per non-empty equal-width confidence bin: its centre, mean confidence,
    accuracy and count (the reliability diagram's data)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append({"bin": round(float((edges[b] + edges[b + 1]) / 2), 4),
                         "confidence": float(confidence[inside].mean()),
                         "accuracy": float(correct[inside].mean()), "count": int(inside.sum())})
    return rows


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over the reliability bins, weighted by the share
    of predictions in each (Guo et al. 2017)."""
    rows = reliability(labels, probabilities, bins)
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / max(len(labels), 1))


def sensitivity_at_specificity(positive: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """The highest true-positive rate among thresholds whose specificity is at least
    ``specificity`` (melanoma: how many are caught when few benign lesions are flagged)."""
    fpr, tpr, _ = roc_curve(positive, score)
    allowed = fpr <= 1 - specificity + 1e-12
    return float(tpr[allowed].max())


def headline(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, macro-F1 (over the classes present) and macro
    one-vs-rest ROC AUC (over the classes with positives and negatives)."""
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    present = sorted(set(labels.tolist()))
    aucs = [roc_auc_score(labels == c, probabilities[:, c]) for c in range(probabilities.shape[1])
            if 0 < (labels == c).sum() < len(labels)]
    return {
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=present, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
    }


def evaluate(labels: np.ndarray, probabilities: np.ndarray, *, mel_specificity: float = 0.9,
             mel_threshold: float | None = None) -> dict:
    """Every metric, as plain JSON types; ``probabilities`` is N x 7 in CLASSES order."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(labels), len(CLASSES)):
        raise PipelineError(f"expected {len(labels)} x {len(CLASSES)} probabilities, got {probabilities.shape}")
    predicted = probabilities.argmax(axis=1)
    everything = list(range(len(CLASSES)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=everything,
                                                                     zero_division=0)
    per_class, aucs = {}, []
    for index, name in enumerate(CLASSES):
        positive = labels == index
        entry = {"precision": float(precision[index]), "recall": float(recall[index]), "f1": float(f1[index]),
                 "support": int(support[index])}
        if 0 < positive.sum() < len(labels):
            entry["roc_auc"] = float(roc_auc_score(positive, probabilities[:, index]))
            entry["average_precision"] = float(average_precision_score(positive, probabilities[:, index]))
            aucs.append(entry["roc_auc"])
        per_class[name] = entry
    present = sorted(set(labels.tolist()))
    result = {
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, predicted, labels=present, average="weighted", zero_division=0)),
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "expected_calibration_error": expected_calibration_error(labels, probabilities),
        "images": int(len(labels)),
        "per_class": per_class,
    }
    mel = CLASSES.index("mel")
    if 0 < (labels == mel).sum() < len(labels):
        result[f"mel_sensitivity_at_specificity_{mel_specificity:g}"] = sensitivity_at_specificity(
            labels == mel, probabilities[:, mel], mel_specificity)
        if mel_threshold is not None:  # chosen on validation, applied here once
            flagged, positive = probabilities[:, mel] >= mel_threshold, labels == mel
            result["mel_operating_point"] = {
                "threshold": float(mel_threshold), "sensitivity": float(flagged[positive].mean()),
                "specificity": float((~flagged[~positive]).mean())}
    return result


def confusion(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    return confusion_matrix(labels, probabilities.argmax(axis=1), labels=list(range(len(CLASSES))))


def roc_points(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, list[dict]]:
    """Per class, the one-vs-rest ROC curve as rows of fpr, tpr."""
    curves = {}
    for index, name in enumerate(CLASSES):
        positive = labels == index
        if 0 < positive.sum() < len(labels):
            fpr, tpr, _ = roc_curve(positive, probabilities[:, index])
            curves[name] = [{"fpr": round(float(f), 6), "tpr": round(float(t), 6)} for f, t in zip(fpr, tpr)]
    return curves


def pr_points(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, list[dict]]:
    """Per class, the one-vs-rest precision-recall curve as rows of recall, precision."""
    curves = {}
    for index, name in enumerate(CLASSES):
        positive = labels == index
        if 0 < positive.sum() < len(labels):
            precision, recall, _ = precision_recall_curve(positive, probabilities[:, index])
            curves[name] = [{"recall": round(float(r), 6), "precision": round(float(p), 6)}
                            for r, p in zip(recall[::-1], precision[::-1])]
    return curves

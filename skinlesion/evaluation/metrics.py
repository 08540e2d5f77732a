"""Clinical metrics for a 7-class lesion classifier.

Balanced accuracy (mean per-class recall, the ISIC 2018 metric) is the headline:
nv is two thirds of the images, so plain accuracy rewards a model that ignores
the rare, dangerous classes. Beside it: macro/weighted F1, per-class precision,
recall, F1 and one-vs-rest ROC AUC, melanoma sensitivity at a fixed specificity,
and expected calibration error.
"""

from __future__ import annotations

import warnings

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

nan = float("nan")


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15, *, lesions: np.ndarray | None = None,
                resamples: int = 0, seed: int = 0) -> list[dict]:
    """Per non-empty equal-width confidence bin: its centre, mean confidence,
    accuracy and count (the reliability diagram's data); with ``lesions`` and
    ``resamples``, the accuracy's 95 % interval too (``accuracy_low``, ``accuracy_high``),
    resampling lesions as the headline intervals do."""
    labels = np.asarray(labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    low = high = None
    if lesions is not None and resamples:
        draws = []
        for weight in _lesion_weights(lesions, resamples, np.random.default_rng(seed)):
            total = np.bincount(which, weights=weight, minlength=bins)
            hits = np.bincount(which, weights=weight * correct, minlength=bins)
            with np.errstate(invalid="ignore", divide="ignore"):
                draws.append(hits / total)
        filled = np.bincount(which, minlength=bins) > 0  # an empty bin has no row (and no interval)
        low, high = np.full(bins, np.nan), np.full(bins, np.nan)
        low[filled], high[filled] = np.nanpercentile(np.array(draws)[:, filled], [2.5, 97.5], axis=0)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            row = {"bin": round(float((edges[b] + edges[b + 1]) / 2), 4),
                   "confidence": float(confidence[inside].mean()),
                   "accuracy": float(correct[inside].mean()), "count": int(inside.sum())}
            if low is not None:
                row.update(accuracy_low=round(float(low[b]), 4), accuracy_high=round(float(high[b]), 4))
            rows.append(row)
    return rows


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over the reliability bins, weighted by the share
    of predictions in each (Guo et al. 2017)."""
    rows = reliability(labels, probabilities, bins)
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / max(len(labels), 1))


def weighted_ece(labels: np.ndarray, probabilities: np.ndarray, weight: np.ndarray, bins: int = 15) -> float:
    """``expected_calibration_error`` when image i counts ``weight[i]`` times."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(float)
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    total = np.bincount(which, weights=weight, minlength=bins)
    gap = np.bincount(which, weights=weight * (correct - confidence), minlength=bins)
    return float(np.abs(gap).sum() / max(total.sum(), 1e-12))


def classwise_ece(labels: np.ndarray, probabilities: np.ndarray, weight: np.ndarray | None = None,
                  bins: int = 15) -> float:
    """Class-wise ECE (Kull et al. 2019): per class, |frequency - mean probability| over
    equal-width bins of that class's probability, weighted by the images in each bin;
    averaged over the classes. It sees every probability, not only the top one."""
    labels = np.asarray(labels)
    weight = np.ones(len(labels)) if weight is None else np.asarray(weight, dtype=float)
    edges = np.linspace(0, 1, bins + 1)[1:-1]
    errors = []
    for c in range(probabilities.shape[1]):
        p = probabilities[:, c]
        which = np.clip(np.digitize(p, edges, right=True), 0, bins - 1)
        total = np.bincount(which, weights=weight, minlength=bins)
        gap = np.bincount(which, weights=weight * ((labels == c) - p), minlength=bins)
        errors.append(np.abs(gap).sum() / max(total.sum(), 1e-12))
    return float(np.mean(errors))


def calibration_change(labels: np.ndarray, calibrated: np.ndarray, uncalibrated: np.ndarray, lesions: np.ndarray, *,
                       resamples: int, seed: int) -> dict:
    """Whether temperature scaling helps here: ECE before and after, their difference
    (after - before; below 0 is better), and its 95 % interval by resampling lesions,
    the same draws for both (a paired difference: the same images, scored two ways)."""
    labels = np.asarray(labels)
    before, after = expected_calibration_error(labels, uncalibrated), expected_calibration_error(labels, calibrated)
    classwise = classwise_ece(labels, uncalibrated), classwise_ece(labels, calibrated)
    draws = [(weighted_ece(labels, uncalibrated, weight), weighted_ece(labels, calibrated, weight),
              classwise_ece(labels, uncalibrated, weight), classwise_ece(labels, calibrated, weight))
             for weight in _lesion_weights(lesions, resamples, np.random.default_rng(seed))]
    draws = np.array(draws)

    def interval(values):
        low, high = np.percentile(values, [2.5, 97.5])
        return {"low": round(float(low), 4), "high": round(float(high), 4)}

    low, high = np.percentile(draws[:, 1] - draws[:, 0], [2.5, 97.5])
    verdict = "helps" if high < 0 else "hurts" if low > 0 else "no measurable change"
    return {"ece_before": round(before, 4), "ece_after": round(after, 4), "difference": round(after - before, 4),
            "ci95": {"low": round(float(low), 4), "high": round(float(high), 4)}, "verdict": verdict,
            "ece_before_ci95": interval(draws[:, 0]), "ece_after_ci95": interval(draws[:, 1]),
            "classwise_ece_before": round(classwise[0], 4), "classwise_ece_after": round(classwise[1], 4),
            "classwise_difference_ci95": interval(draws[:, 3] - draws[:, 2])}


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


def weighted_auc(positive: np.ndarray, score: np.ndarray, weight: np.ndarray) -> float:
    """ROC AUC when image i counts ``weight[i]`` times: the weighted probability that a
    positive outscores a negative, ties counting half (what roc_auc_score gives with
    ``sample_weight``, in one pass over the sorted scores)."""
    return float(_weighted_aucs(np.asarray(positive, dtype=bool), np.asarray(score),
                                np.asarray(weight, dtype=np.float64)[None])[0])


def _weighted_aucs(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``weighted_auc`` for every row of ``weights`` (draws x images) at once: the
    scores are sorted and their ties grouped once, then each draw is a row of sums."""
    order = np.argsort(score, kind="stable")
    ordered = score[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # one group per distinct score
    sorted_weights, is_positive = weights[:, order], positive[order]
    pos = np.add.reduceat(sorted_weights * is_positive, starts, axis=1)
    neg = np.add.reduceat(sorted_weights * ~is_positive, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def _weighted_figures(labels: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray, weights: np.ndarray,
                      mel_flagged: np.ndarray | None) -> dict[str, np.ndarray]:
    """The headline figures when image i counts ``weights[d, i]`` times in draw d (a
    bootstrap draw per row; one row of ones: the figures themselves), flattened
    (``recall.mel``...) to one value per draw: the draws are scored together, as
    matrix products, not one by one."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    classes = probabilities.shape[1]
    truth, said = np.eye(classes)[labels], np.eye(classes)[predicted]
    true = weights @ truth
    hit = weights @ (truth * (predicted == labels)[:, None])
    predicted_as = weights @ said
    present = true > 0
    zeros = np.zeros_like(true)
    recall = np.divide(hit, true, out=zeros.copy(), where=present)
    precision = np.divide(hit, predicted_as, out=zeros.copy(), where=predicted_as > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=zeros.copy(), where=precision + recall > 0)
    counted = present.sum(axis=1)
    figures = {"balanced_accuracy": (recall * present).sum(axis=1) / counted,
               "accuracy": hit.sum(axis=1) / true.sum(axis=1), "macro_f1": (f1 * present).sum(axis=1) / counted}
    total = weights.sum(axis=1)
    aucs = np.full((len(weights), classes), np.nan)
    for c in range(classes):
        positive = labels == c
        if positive.any() and not positive.all():
            drawn = true[:, c]
            both = (drawn > 0) & (drawn < total)  # the class with positives and negatives in the draw
            aucs[both, c] = _weighted_aucs(positive, probabilities[:, c], weights[both])
    scored = np.isfinite(aucs).sum(axis=1)
    figures["macro_roc_auc"] = np.divide(np.nansum(aucs, axis=1), scored, out=np.full(len(weights), np.nan),
                                         where=scored > 0)
    for c in range(classes):
        figures[f"recall.{CLASSES[c]}"] = np.where(present[:, c], recall[:, c], np.nan)
    if mel_flagged is not None:
        mel = (labels == CLASSES.index("mel")).astype(float)
        flagged = np.asarray(mel_flagged, dtype=float)
        positives, negatives = weights @ mel, weights @ (1 - mel)
        figures["melanoma_sensitivity"] = np.divide(weights @ (mel * flagged), positives,
                                                    out=np.full(len(weights), np.nan), where=positives > 0)
        figures["melanoma_specificity"] = np.divide(weights @ ((1 - mel) * (1 - flagged)), negatives,
                                                    out=np.full(len(weights), np.nan), where=negatives > 0)
    return figures


def _figures(labels: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray,
             mel_flagged: np.ndarray | None) -> dict:
    """The headline figures of the images as they are (every weight one), nested as
    the metrics file writes them (``recall: {class: value}``)."""
    flat = _weighted_figures(labels, predicted, probabilities, np.ones((1, len(labels))), mel_flagged)
    return _nested({key: float(values[0]) for key, values in flat.items()})


def _nested(flat: dict) -> dict:
    """``{"recall.mel": x}`` as ``{"recall": {"mel": x}}``: the flattened figures of a
    draw, nested as the metrics file writes them."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def _lesion_weights(lesions: np.ndarray, resamples: int, rng: np.random.Generator):
    """Per-image weights of ``resamples`` bootstrap draws of lesions with replacement
    (every image of a drawn lesion counts as often as its lesion was drawn)."""
    _, lesion_of = np.unique(np.asarray(lesions).astype(str), return_inverse=True)
    count = lesion_of.max() + 1
    for _ in range(resamples):
        yield np.bincount(rng.integers(0, count, count), minlength=count)[lesion_of].astype(float)


def _lesion_weight_blocks(lesions: np.ndarray, resamples: int, rng: np.random.Generator, block: int = 250):
    """``_lesion_weights``'s draws (the same ones, in order) stacked ``block`` at a time
    into draws x images matrices, so that memory stays bounded on large sets."""
    rows = []
    for weight in _lesion_weights(lesions, resamples, rng):
        rows.append(weight)
        if len(rows) == block:
            yield np.stack(rows)
            rows = []
    if rows:
        yield np.stack(rows)


def _percentile_intervals(draws: dict[str, np.ndarray]) -> dict:
    intervals = {}
    for key, values in draws.items():
        with warnings.catch_warnings():  # a class absent from every draw has no interval: nan, said once
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(values, [2.5, 97.5])
        intervals[key] = {"low": round(float(low), 4), "high": round(float(high), 4)}
    return _nested(intervals)


def _bootstrap_draws(labels: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray, lesions: np.ndarray,
                     flagged: np.ndarray | None, resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    blocks = [_weighted_figures(labels, predicted, probabilities, weights, flagged)
              for weights in _lesion_weight_blocks(lesions, resamples, rng)]
    return {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}


def bootstrap_intervals(labels: np.ndarray, probabilities: np.ndarray, lesions: np.ndarray, *, resamples: int,
                        seed: int, mel_threshold: float | None = None) -> dict:
    """95 % percentile intervals of the headline figures, resampling **lesions** with
    replacement (all images of a drawn lesion come along): images of one lesion are
    not independent, so resampling images would make the intervals too narrow."""
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    flagged = None if mel_threshold is None else probabilities[:, CLASSES.index("mel")] >= mel_threshold
    return _percentile_intervals(_bootstrap_draws(labels, predicted, probabilities, lesions, flagged, resamples,
                                                  np.random.default_rng(seed)))


def report(labels: np.ndarray, probabilities: np.ndarray, lesions: np.ndarray, *, uncalibrated: np.ndarray | None = None,
           mel_threshold: float | None = None, mel_specificity: float = 0.9, resamples: int = 1000,
           seed: int = 0) -> tuple[dict, dict]:
    """The figures people compare (headline first, each with its 95 % lesion-bootstrap
    interval) and the details (per-class precision, F1, support, AP...)."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(labels), len(CLASSES)):
        raise PipelineError(f"expected {len(labels)} x {len(CLASSES)} probabilities, got {probabilities.shape}")
    mel = CLASSES.index("mel")
    has_mel = 0 < (labels == mel).sum() < len(labels)
    threshold = mel_threshold if has_mel else None
    flagged = None if threshold is None else probabilities[:, mel] >= threshold
    figures = _figures(labels, probabilities.argmax(axis=1), probabilities, flagged)
    headline_figures = {key: figures[key] for key in ("balanced_accuracy", "accuracy", "macro_f1", "macro_roc_auc")}
    result = {**headline_figures, "recall": figures["recall"],
              "expected_calibration_error": expected_calibration_error(labels, probabilities)}
    if uncalibrated is not None:
        result["expected_calibration_error_uncalibrated"] = expected_calibration_error(labels, uncalibrated)
        result["calibration"] = calibration_change(labels, probabilities, np.asarray(uncalibrated, dtype=np.float64),
                                                   lesions, resamples=resamples, seed=seed)
    if threshold is not None:  # chosen on validation, applied here once
        result["melanoma"] = {"threshold": float(threshold), "sensitivity": figures["melanoma_sensitivity"],
                              "specificity": figures["melanoma_specificity"]}
    result["images"] = int(len(labels))
    result["lesions"] = int(len(set(np.asarray(lesions).astype(str))))
    result["ci95"] = bootstrap_intervals(labels, probabilities, lesions, resamples=resamples, seed=seed,
                                         mel_threshold=threshold)
    result["ci95"]["resamples"] = resamples
    details = evaluate(labels, probabilities, mel_specificity=mel_specificity)
    return result, details


def evaluate(labels: np.ndarray, probabilities: np.ndarray, *, mel_specificity: float = 0.9) -> dict:
    """Every per-class figure, as plain JSON types; ``probabilities`` is N x 7 in CLASSES order."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    everything = list(range(len(CLASSES)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=everything,
                                                                     zero_division=0)
    per_class = {}
    for index, name in enumerate(CLASSES):
        positive = labels == index
        entry = {"precision": float(precision[index]), "recall": float(recall[index]), "f1": float(f1[index]),
                 "support": int(support[index])}
        if 0 < positive.sum() < len(labels):
            entry["roc_auc"] = float(roc_auc_score(positive, probabilities[:, index]))
            entry["average_precision"] = float(average_precision_score(positive, probabilities[:, index]))
        per_class[name] = entry
    present = sorted(set(labels.tolist()))
    result = {"weighted_f1": float(f1_score(labels, predicted, labels=present, average="weighted", zero_division=0)),
              "per_class": per_class}
    mel = CLASSES.index("mel")
    if 0 < (labels == mel).sum() < len(labels):
        # Optimistic: the threshold is read off the test ROC itself. Not a result; the
        # melanoma operating point chosen on validation is in the headline metrics.
        result[f"mel_sensitivity_at_specificity_{mel_specificity:g}_test_roc_readoff"] = sensitivity_at_specificity(
            labels == mel, probabilities[:, mel], mel_specificity)
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


def difference_intervals(a: tuple, b: tuple, *, resamples: int, seed: int) -> dict:
    """The headline figures of two scored sets (each ``(labels, probabilities, lesions)``)
    and of ``b - a``, with 95 % intervals of the difference: each set's lesions are
    resampled on their own (the sets are independent, e.g. two runs' test splits), and
    the difference is taken draw by draw. When both are the same images, use the paired
    difference instead (not this)."""
    rng = np.random.default_rng(seed)
    figures, draws = [], []
    for labels, probabilities, lesions in (a, b):
        labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
        predicted = probabilities.argmax(axis=1)
        figures.append(_figures(labels, predicted, probabilities, None))
        draws.append(_bootstrap_draws(labels, predicted, probabilities, lesions, None, resamples, rng))
    result = {}
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "macro_roc_auc"):
        differences = draws[1][key] - draws[0][key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(differences, [2.5, 97.5])
        result[key] = {"a": round(figures[0][key], 4), "b": round(figures[1][key], 4),
                       "difference": round(figures[1][key] - figures[0][key], 4),
                       "ci95": {"low": round(float(low), 4), "high": round(float(high), 4)}}
    return result

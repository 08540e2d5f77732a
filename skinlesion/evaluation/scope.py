"""Knowing when not to answer: a score per image of how far it lies from the training
data, and the threshold, chosen on validation, past which the pipeline says "this does
not look like the dermatoscopic images the model was trained on" instead of a diagnosis.

Three candidates, each larger for an image further out:

- ``msp``: one minus the maximum softmax probability (Hendrycks & Gimpel 2017), of
  the probabilities as scored;
- ``energy``: minus the log-sum-exp of the logits (Liu et al. 2020), of the plain view;
- ``mahalanobis``: the squared Mahalanobis distance of the pooled image features to
  the nearest class mean under one shared covariance (Lee et al. 2018), both fitted on
  the **train** split, Ledoit-Wolf shrunk (``skinlesion.training.models.Scope``
  computes it inside the model, so the ONNX export carries it too).

The threshold keeps ``retention`` (95 %) of the validation images in scope. The scope
stage measures every candidate on images that no training and no threshold saw.
No PyTorch here."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from skinlesion import PipelineError
from skinlesion.files import atomic_path
from skinlesion.untrusted import first_line

METHODS = ("msp", "energy", "mahalanobis")
NOTICE = "this does not look like the dermatoscopic images the model was trained on"


def scores(method: str, *, logits: np.ndarray | None = None, probabilities: np.ndarray | None = None,
           distances: np.ndarray | None = None) -> np.ndarray:
    """Per-image out-of-scope scores of ``method`` from what it needs: ``probabilities``
    (as scored) for msp, the plain view's ``logits`` for energy, the model's
    Mahalanobis ``distances`` for mahalanobis."""
    if method == "msp":
        return 1.0 - np.asarray(probabilities, dtype=np.float64).max(axis=1)
    if method == "energy":
        return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)
    if method == "mahalanobis":
        return np.asarray(distances, dtype=np.float64)
    raise PipelineError(f"calibrate.scope is '{method}'; expected none or one of {', '.join(METHODS)}")


def candidates(logits: np.ndarray, probabilities: np.ndarray, distances: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every candidate's scores from one scoring of the images: the views' ``logits``
    (V x N x classes, the plain view first), their ``probabilities`` as scored and the
    model's Mahalanobis ``distances`` (None: a model without them, and no mahalanobis)."""
    found = {"msp": scores("msp", probabilities=probabilities), "energy": scores("energy", logits=logits[0])}
    if distances is not None:
        found["mahalanobis"] = scores("mahalanobis", distances=distances)
    return found


def save_candidates(path, image_ids, found: dict[str, np.ndarray], model_digest: str) -> None:
    """The candidates' scores of the images ``image_ids`` under the model file whose
    digest is ``model_digest`` (the evaluate stage's scoring of the test split, so that
    the scope stage does not score it again)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, image_id=np.asarray(list(image_ids), dtype=str), model=np.asarray(model_digest),
                 **{f"score_{name}": np.asarray(values) for name, values in found.items()})


def load_candidates(path, image_ids, model_digest: str, hint: str) -> dict[str, np.ndarray]:
    """``save_candidates``'s scores, refused in one line (with ``hint``) when the file is
    missing or not the scoring of these images under this model file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as saved:
            stored = {key: saved[key] for key in saved.files}
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file; {hint}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        reason = first_line(error)
        raise PipelineError(f"{path}: not a file of scores ({reason}); {hint}") from None
    if str(stored.get("model", "")) != model_digest:
        raise PipelineError(f"{path} scored another model file than this one (a stale evaluation); {hint}")
    if stored.get("image_id", np.array([])).tolist() != [str(i) for i in image_ids]:
        raise PipelineError(f"{path} does not list the {len(image_ids)} test images in their order; {hint}")
    return {key.removeprefix("score_"): values for key, values in stored.items() if key.startswith("score_")}


RESOLUTION = 1e-2  # the smallest feature spread the Mahalanobis distance resolves, relative to their size


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means (C x D) and the whitening W (D x D, W W^T the precision of the
    covariance they share, Ledoit-Wolf shrunk), from the train split's pooled features."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise PipelineError(f"class {missing[0]} has no train image; the out-of-scope score cannot be fitted")
    means = np.stack([features[labels == c].mean(axis=0) for c in range(num_classes)])
    centred = features - means[labels]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    # A floor under the variances: differences below a hundredth of the features' typical
    # size are taken as float32 noise, which differs between backends (PyTorch, ONNX
    # Runtime). Shrinkage alone leaves a model whose features hardly vary (an untrained
    # network: spread 1e-9 of their size) with a distance made of rounding error.
    floor = RESOLUTION ** 2 * float(np.mean(features ** 2))
    # W with W W^T = the precision: the inverse of the covariance's Cholesky factor, transposed
    factor = np.linalg.cholesky(covariance + max(floor, np.finfo(np.float64).tiny) * np.eye(len(covariance)))
    whitening = np.linalg.inv(factor).T
    return means.astype(np.float32), whitening.astype(np.float32)


def threshold(validation_scores: np.ndarray, retention: float) -> float:
    """The score at or below which ``retention`` of the validation images lie."""
    values = np.asarray(validation_scores, dtype=np.float64)
    if not len(values) or not np.isfinite(values).all():
        raise PipelineError("the out-of-scope scores of the validation images are missing or not finite")
    return float(np.quantile(values, retention, method="higher"))


def separation(inside: np.ndarray, outside: np.ndarray, limit: float | None = None, retention: float = 0.95) -> dict:
    """How well the scores tell ``outside`` images from ``inside`` ones: AUROC (outside
    positive), the false-positive rate at ``retention`` of the inside kept (the share
    of outside images still answered at the threshold keeping that share of ``inside``),
    and, with ``limit`` (the model's own threshold), the shares each side of it."""
    inside, outside = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    cut = np.quantile(inside, retention, method="higher")
    result = {"images": int(len(outside)),
              "auroc": round(float(roc_auc_score(labels, np.r_[inside, outside])), 4),
              f"fpr_at_{round(retention * 100)}": round(float((outside <= cut).mean()), 4)}
    if limit is not None:
        result["caught"] = round(float((outside > limit).mean()), 4)
        result["in_distribution_kept"] = round(float((inside <= limit).mean()), 4)
    return result

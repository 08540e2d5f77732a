"""How a trained model is meant to be scored, fitted on the validation split only.

The train stage selects weights; this module chooses, on validation, everything that
turns the network's logits into the pipeline's answer, and the model file carries it
so that `evaluate`, `explain` and the prediction command all answer alike:

- test-time augmentation (the views whose softmax is averaged);
- post-hoc logit adjustment (Menon et al., "Long-tail learning via logit adjustment",
  ICLR 2021): ``logits - tau * log(prior)``, with ``tau`` chosen on validation, which
  moves the operating point between plain accuracy (tau = 0 for a model trained on the
  natural class mix) and balanced accuracy (tau near 1) without retraining;
- temperature scaling (Guo et al. 2017): one T > 0 dividing the logits, fitted by
  validation log-loss; it changes confidence, never the predicted class of a view.
  With ``method: auto`` it is applied only where it helps: temperatures fitted on four
  fifths of the validation lesions score the fifth left out, and temperature scaling is
  kept if those held-out probabilities have a lower top-label ECE than the unscaled ones.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import softmax
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold

from skinlesion import PipelineError
from skinlesion.evaluation.metrics import classwise_ece, expected_calibration_error

log = logging.getLogger(__name__)

TAU_GRID = np.round(np.arange(-1.0, 2.0001, 0.05), 2)
IDENTITY = {"tta": "none", "tau": 0.0, "log_prior": None, "temperature": 1.0}


def adjusted(view_logits: np.ndarray, scoring: dict) -> np.ndarray:
    """V x N x C logits after the logit adjustment and temperature of ``scoring``."""
    logits = np.asarray(view_logits, dtype=np.float64)
    if scoring.get("tau") and scoring.get("log_prior") is not None:
        logits = logits - scoring["tau"] * np.asarray(scoring["log_prior"], dtype=np.float64)
    return logits / float(scoring.get("temperature", 1.0))


def probabilities(view_logits: np.ndarray, scoring: dict) -> np.ndarray:
    """N x C class probabilities: the softmax of each view's adjusted logits, averaged."""
    return softmax(adjusted(view_logits, scoring), axis=-1).mean(axis=0)


def log_prior(labels: np.ndarray, num_classes: int) -> list[float]:
    """log of the class shares of ``labels`` (the population the model is applied to)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise PipelineError("a class has no training image; the class prior is undefined")
    return np.log(counts / counts.sum()).tolist()


def _objective(labels: np.ndarray, predicted: np.ndarray, adjust: str) -> float:
    balanced = balanced_accuracy_score(labels, predicted)
    if adjust == "balanced_accuracy":
        return balanced
    return (balanced + float((predicted == labels).mean())) / 2


def fit_tau(view_logits: np.ndarray, labels: np.ndarray, prior: list[float], adjust: str) -> tuple[float, list[dict]]:
    """The logit-adjustment strength that maximises ``adjust`` on these (validation)
    images, and the whole search as rows of tau, balanced accuracy, accuracy. Ties go
    to the smallest |tau|: no adjustment unless it helps."""
    rows = []
    for tau in TAU_GRID:
        predicted = probabilities(view_logits, {"tau": float(tau), "log_prior": prior}).argmax(axis=1)
        rows.append({"tau": float(tau), "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
                     "accuracy": float((predicted == labels).mean()),
                     "objective": 0.0 if adjust == "none" else _objective(labels, predicted, adjust)})
    if adjust == "none":
        return 0.0, rows
    best = max(rows, key=lambda row: (round(row["objective"], 12), -abs(row["tau"])))
    return best["tau"], rows


def mean_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of ``labels`` under the N x C ``probs``."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def log_loss(view_logits: np.ndarray, labels: np.ndarray, scoring: dict) -> float:
    """Mean negative log-likelihood of the averaged probabilities."""
    return mean_nll(probabilities(view_logits, scoring), labels)


def fit_temperature(view_logits: np.ndarray, labels: np.ndarray, scoring: dict) -> float:
    """The temperature (0.05..20) minimising validation log-loss, given ``scoring``'s
    logit adjustment."""
    def loss(log_t: float) -> float:
        return log_loss(view_logits, labels, {**scoring, "temperature": float(np.exp(log_t))})

    result = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def choose_method(view_logits: np.ndarray, labels: np.ndarray, lesions: np.ndarray, scoring: dict,
                  folds: int = 5) -> tuple[str, dict]:
    """``temperature`` or ``none``, by what each does to validation images it was not
    fitted on: the lesions split into ``folds`` groups, each scored with the temperature
    fitted on the others, the held-out probabilities pooled. Temperature scaling is kept
    only if its held-out top-label ECE is lower (a tie keeps the logits as they are);
    the class-wise ECE and log-loss of both are reported beside it."""
    labels, lesions = np.asarray(labels), np.asarray(lesions).astype(str)
    groups = len(set(lesions))
    if groups < 2:  # nothing to hold out: no evidence that it helps, so it is not applied
        log.warning("calibrate.method auto: the validation split has %d lesion(s), too few to check temperature "
                    "scaling on lesions held out from its fit; it is not applied", groups)
        return "none", {"folds": 0, "fold_temperatures": [], "held_out": None, "chosen": "none"}
    held = {"none": probabilities(view_logits, {**scoring, "temperature": 1.0}),  # nothing fitted: no fold needed
            "temperature": np.zeros((len(labels), view_logits.shape[-1]))}
    temperatures = []
    for fitted, left_out in GroupKFold(n_splits=min(folds, groups)).split(labels, groups=lesions):
        t = fit_temperature(view_logits[:, fitted], labels[fitted], scoring)
        temperatures.append(round(t, 4))
        held["temperature"][left_out] = probabilities(view_logits[:, left_out], {**scoring, "temperature": t})
    figures = {name: {"ece": round(expected_calibration_error(labels, p), 5),
                      "classwise_ece": round(classwise_ece(labels, p), 5), "log_loss": round(mean_nll(p, labels), 5)}
               for name, p in held.items()}
    chosen = "temperature" if figures["temperature"]["ece"] < figures["none"]["ece"] else "none"
    return chosen, {"folds": len(temperatures), "fold_temperatures": temperatures, "held_out": figures,
                    "chosen": chosen}


def threshold_for_sensitivity(positive: np.ndarray, score: np.ndarray, sensitivity: float) -> float:
    """The highest score threshold whose sensitivity (share of positives with
    ``score >= threshold``) is at least ``sensitivity`` on these images."""
    scores = np.sort(np.asarray(score, dtype=np.float64)[np.asarray(positive, dtype=bool)])[::-1]
    if not len(scores):
        raise PipelineError("no melanoma image in the validation split; cannot choose a threshold")
    needed = int(np.ceil(sensitivity * len(scores) - 1e-9))
    return float(scores[max(needed, 1) - 1])


def fit(view_logits: np.ndarray, labels: np.ndarray, train_labels: np.ndarray, *, tta: str, adjust: str,
        method: str, mel_sensitivity: float, classes, lesions: np.ndarray | None = None) -> tuple[dict, dict]:
    """Everything chosen on validation: returns the model file's ``scoring`` and a
    report of the validation figures before and after. ``method`` is none,
    temperature, or auto (``choose_method``, which needs the images' ``lesions``)."""
    prior = log_prior(train_labels, len(classes))
    tau, search = fit_tau(view_logits, labels, prior, adjust)
    scoring = {"tta": tta, "tau": tau, "log_prior": prior, "temperature": 1.0}
    selection = None
    if method == "auto":
        if lesions is None:
            raise PipelineError("calibrate.method auto needs the validation images' lesion_id")
        chosen, selection = choose_method(view_logits, labels, lesions, scoring)
    else:
        chosen = method
    scoring["method"] = chosen
    if chosen == "temperature":
        scoring["temperature"] = fit_temperature(view_logits, labels, scoring)
    raw = {"tta": tta, "tau": 0.0, "log_prior": prior, "temperature": 1.0}
    mel = list(classes).index("mel")
    calibrated = probabilities(view_logits, scoring)
    scoring["mel_threshold"] = threshold_for_sensitivity(labels == mel, calibrated[:, mel], mel_sensitivity)
    report = {"tta": tta, "adjust": adjust, "tau": tau, "method": method, "method_chosen": chosen,
              **({"method_selection": selection} if selection else {}), "temperature": scoring["temperature"],
              "mel_target_sensitivity": mel_sensitivity, "mel_threshold": scoring["mel_threshold"],
              "val_log_loss_before": log_loss(view_logits, labels, raw),
              "val_log_loss_after": log_loss(view_logits, labels, scoring),
              "val_before": _figures(labels, probabilities(view_logits, raw)),
              "val_after": _figures(labels, calibrated), "tau_search": search}
    return scoring, report


def _figures(labels: np.ndarray, probs: np.ndarray) -> dict:
    predicted = probs.argmax(axis=1)
    return {"balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "accuracy": float((predicted == labels).mean())}

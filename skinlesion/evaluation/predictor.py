"""The one scoring path: a model file or its ONNX export, as a ``Predictor`` that turns
uint8 images (and, for a model that takes it, the patient's encoded metadata) into the
pipeline's answer the way the file says: the test-time views, their logits, the logit
adjustment and temperature chosen on validation, the averaged probabilities, and the
melanoma flag, and whether the image is in scope at all (``scope_scores``,
``in_scope``; skinlesion.evaluation.scope). Evaluate, external, the prediction and scoring commands
and the page all go through it; the PyTorch backend is
``skinlesion.evaluation.inference.TorchPredictor``, the ONNX one
``skinlesion.deployment.runtime.OnnxPredictor``. No PyTorch is imported here."""

from __future__ import annotations

import numpy as np

from skinlesion import PipelineError, modelinfo
from skinlesion.data import patient
from skinlesion.evaluation import calibrate, scope
from skinlesion.params import TTA


def check_views(tta: str, images: np.ndarray, info: modelinfo.ModelInfo) -> None:
    """Refuse a ``tta`` that is not one of the views, or images not at the model's size."""
    if tta not in TTA:
        raise PipelineError(f"tta is '{tta}'; expected one of {', '.join(TTA)}")
    size = info.image_size
    if images.shape[1:] != (size, size, 3):
        raise PipelineError(f"images are {images.shape[1:]}, the model expects {(size, size, 3)}")


def patient_rows(info: modelinfo.ModelInfo, frame) -> np.ndarray | None:
    """The encoded metadata of ``frame``'s rows (age, sex, localization columns) for a
    model that takes it (its file records the encoding), else None."""
    return patient.encode(frame, info.patient.model_dump()) if info.patient is not None else None


# In reduced precision, answers this close to a decision are scored again in float32:
# probabilities for the class and melanoma decisions, relative to the threshold for the
# out-of-scope score. The largest bf16 difference measured on the real test split was
# 0.0066 in probability; at 0.02, 7 % of a trained model's test images are scored again
# (docs/benchmark.md).
RECHECK = 0.02


def view_count(tta: str) -> int:
    return {"none": 1, "flips": 4, "dihedral": 8}[tta]


class Predictor:
    """A loaded model and its description (``info``: classes, image size, normalisation,
    ``scoring``, the metadata encoding of a model that takes it)."""

    def __init__(self, info: modelinfo.ModelInfo | dict):
        self.info = info = modelinfo.described(info)
        # The identity (no views, no adjustment) for a model straight from training.
        self.scoring = {**calibrate.IDENTITY, **(info.scoring.dump() if info.scoring is not None else {})}

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    @property
    def scope_method(self) -> str | None:
        """The file's out-of-scope score (msp, energy, mahalanobis), or None without one."""
        return None if self.info.scope is None else self.info.scope.method

    @property
    def takes_patient(self) -> bool:
        return self.info.patient is not None

    def view_logits(self, images: np.ndarray, *, tta: str, batch_size: int = 128, progress: str | None = None,
                    patient: np.ndarray | None = None) -> np.ndarray:
        """V x N x classes raw logits, one slice per test-time view of ``tta``."""
        raise NotImplementedError

    def patient_rows(self, frame) -> np.ndarray | None:
        return patient_rows(self.info, frame)

    @property
    def reduced(self) -> bool:
        """Whether this backend scores in reduced precision (bf16); see ``exact``."""
        return False

    def exact(self):
        """This predictor, scoring in float32 (itself where it already does)."""
        return self

    def view_outputs(self, images: np.ndarray, *, tta: str, batch_size: int = 128, progress: str | None = None,
                     patient: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The V x N x classes logits of ``tta``'s views and, for a model carrying the
        Mahalanobis out-of-scope score, each image's distance (its plain view, the first
        of every ``tta``), else None. Backends override this with one pass over the views."""
        logits = self.view_logits(images, tta=tta, batch_size=batch_size, progress=progress, patient=patient)
        distances = None
        if self.scope_method == "mahalanobis":
            _, distances = self.plain_outputs(images, batch_size=batch_size, patient=patient)
        return logits, distances

    def outputs(self, images: np.ndarray, *, batch_size: int = 128, progress: str | None = None,
                patient: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``view_outputs`` for the file's views, in its precision. In reduced precision
        the images whose answer lies within ``scoring.recheck`` of a decision (the top two
        classes, the melanoma threshold, the out-of-scope threshold) are scored again in
        float32, so every decision is float32's and the rest move by less than the margin."""
        logits, distances = self.view_outputs(images, tta=self.scoring["tta"], batch_size=batch_size,
                                              progress=progress, patient=patient)
        if self.reduced and logits.shape[1]:
            probabilities = calibrate.probabilities(logits, self.scoring)
            close = self.near_a_decision(probabilities)
            scores = self._scores(logits, probabilities, distances)
            if scores is not None:
                close |= self.near_the_scope_threshold(scores)
            if close.any():
                again, again_distances = self.exact().view_outputs(
                    images[close], tta=self.scoring["tta"], batch_size=batch_size,
                    patient=None if patient is None else patient[close])
                logits[:, close] = again
                if distances is not None:
                    distances[close] = again_distances
        return logits, distances

    def answer(self, images: np.ndarray, *, batch_size: int = 128, progress: str | None = None,
               patient: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Everything the file says about the images, from one pass: the views' logits,
        the N x classes probabilities and the out-of-scope scores (None without a score)."""
        logits, distances = self.outputs(images, batch_size=batch_size, progress=progress, patient=patient)
        probabilities = calibrate.probabilities(logits, self.scoring).astype(np.float32)
        return logits, probabilities, self._scores(logits, probabilities, distances)

    def probabilities(self, images: np.ndarray, *, batch_size: int = 128, progress: str | None = None,
                      patient: np.ndarray | None = None) -> np.ndarray:
        """N x classes probabilities, scored as the model file says (``answer``)."""
        return self.answer(images, batch_size=batch_size, progress=progress, patient=patient)[1]

    def _scores(self, logits: np.ndarray, probabilities: np.ndarray, distances: np.ndarray | None):
        method = self.scope_method
        if method is None:
            return None
        return scope.scores(method, logits=logits[0], probabilities=probabilities, distances=distances)

    def near_the_scope_threshold(self, scores: np.ndarray) -> np.ndarray:
        """Rows whose out-of-scope score is within ``scoring.recheck`` of the threshold,
        relative to its size."""
        threshold = self.info.scope.threshold
        margin = float(self.scoring.get("recheck", RECHECK))
        return np.abs(np.asarray(scores) - threshold) <= margin * max(abs(threshold), 1.0)

    def near_a_decision(self, probabilities: np.ndarray) -> np.ndarray:
        """Rows within ``scoring.recheck`` of a decision: the top two probabilities
        closer than that, or melanoma's that close to its threshold."""
        margin = float(self.scoring.get("recheck", RECHECK))
        top = np.sort(probabilities, axis=1)
        close = top[:, -1] - (top[:, -2] if top.shape[1] > 1 else 0.0) < margin
        threshold = self.scoring.get("mel_threshold")
        if threshold is not None and "mel" in self.classes:
            close |= np.abs(probabilities[:, self.classes.index("mel")] - threshold) < margin
        return close

    def plain_outputs(self, images: np.ndarray, *, batch_size: int = 128, patient: np.ndarray | None = None,
                      progress: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The plain view's raw logits (N x classes) and, for a model that carries the
        Mahalanobis out-of-scope score, each image's distance (else None)."""
        raise NotImplementedError

    def scope_scores(self, images: np.ndarray, *, batch_size: int = 128, patient: np.ndarray | None = None,
                     progress: str | None = None) -> np.ndarray | None:
        """Each image's out-of-scope score by the model file's method (larger: further
        from the training data), or None for a model without one (``answer``'s)."""
        return self.answer(images, batch_size=batch_size, patient=patient, progress=progress)[2]

    def in_scope(self, scores: np.ndarray | None) -> np.ndarray | None:
        """Whether each score keeps its image in scope (at most the threshold chosen on
        validation), or None for a model without a score."""
        if scores is None or self.info.scope is None:
            return None
        return np.asarray(scores) <= self.info.scope.threshold

    def melanoma_flags(self, probabilities: np.ndarray) -> np.ndarray | None:
        """Whether each image crosses the melanoma threshold chosen on validation, or None
        for a model without one."""
        threshold = self.scoring.get("mel_threshold")
        if threshold is None or "mel" not in self.classes:
            return None
        return np.asarray(probabilities)[:, self.classes.index("mel")] >= threshold

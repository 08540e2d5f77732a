"""The PyTorch backend of the one scoring path (skinlesion.evaluation.predictor): a
model file's network run on its test-time views, on the CPU or a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from skinlesion import modelinfo
from skinlesion.evaluation.predictor import Predictor, check_views, view_count
from skinlesion.progress import bar
from skinlesion.training import devices, models


def _views(batch: torch.Tensor, tta: str) -> list[torch.Tensor]:
    if tta == "none":
        return [batch]
    views = [batch, batch.flip(3), batch.flip(2), batch.flip(2).flip(3)]
    if tta == "dihedral":
        views += [view.transpose(2, 3) for view in views]
    return views


def scoring_device() -> torch.device:
    """Where the scoring stages run: the GPU when there is one, in true float32 (no
    TF32), so its probabilities match the CPU's and the ONNX export's; else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


def normalise(images: np.ndarray, info: modelinfo.ModelInfo | dict, device) -> torch.Tensor:
    """uint8 N x S x S x 3 -> the float tensor the model was trained on."""
    info = modelinfo.described(info)
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return models.normalise(batch, info.mean, info.std)


def scoring_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a model file's ``scoring.precision`` on ``device``: bf16
    where it is native (a CPU with AVX-512 BF16 or AMX, a GPU with bfloat16) for ``auto``
    and ``bf16``; None (float32) for ``fp32`` and where bf16 would be emulated."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and devices.cpu_has_bf16():
        return torch.bfloat16
    return None


@torch.no_grad()
def view_logits(model, info: modelinfo.ModelInfo | dict, images: np.ndarray, *, tta: str, batch_size: int = 128,
                device: str | torch.device = "cpu", progress: str | None = None,
                patient: np.ndarray | None = None, amp: torch.dtype | None = None) -> np.ndarray:
    """V x N x classes raw logits, one slice per test-time view of ``tta``; ``patient``:
    the images' encoded metadata, for a model that takes it (the same row for every view);
    ``amp``: the autocast dtype of the forward pass (None: float32)."""
    info = modelinfo.described(info)
    check_views(tta, images, info)
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in starts if progress is None else bar(starts, desc=progress, unit="batch"):
        batch = normalise(images[start:start + batch_size], info, device)
        extra = [] if patient is None else [torch.as_tensor(patient[start:start + batch_size], device=device)]
        with devices.autocast(device, amp):
            out.append(torch.stack([model(view, *extra).float() for view in _views(batch, tta)]).cpu())
    if not out:
        return np.zeros((view_count(tta), 0, len(info.classes)), dtype=np.float32)
    return torch.cat(out, dim=1).numpy()


@torch.no_grad()
def view_outputs(model, info: modelinfo.ModelInfo | dict, images: np.ndarray, *, tta: str, batch_size: int = 128,
                 device: str | torch.device = "cpu", progress: str | None = None,
                 patient: np.ndarray | None = None, amp: torch.dtype | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """``view_logits`` and, for a model carrying the Mahalanobis score (``model.scope``),
    the plain view's distances (float32) from the same pass; else None."""
    info = modelinfo.described(info)
    scope = getattr(model, "scope", None)
    if scope is None:
        return view_logits(model, info, images, tta=tta, batch_size=batch_size, device=device, progress=progress,
                           patient=patient, amp=amp), None
    check_views(tta, images, info)
    model.eval()
    out, distances = [], []
    starts = range(0, len(images), batch_size)
    for start in starts if progress is None else bar(starts, desc=progress, unit="batch"):
        batch = normalise(images[start:start + batch_size], info, device)
        extra = [] if patient is None else [torch.as_tensor(patient[start:start + batch_size], device=device)]
        plain, *others = _views(batch, tta)
        with devices.autocast(device, amp):
            first, pooled = model.forward_features(plain, *extra)
            logits = [first.float()] + [model(view, *extra).float() for view in others]
        out.append(torch.stack(logits).cpu())
        distances.append(scope(pooled.float()).cpu())
    if not out:
        return np.zeros((view_count(tta), 0, len(info.classes)), dtype=np.float32), np.zeros(0, np.float32)
    return torch.cat(out, dim=1).numpy(), torch.cat(distances).numpy()


@torch.no_grad()
def plain_outputs(model, info: modelinfo.ModelInfo | dict, images: np.ndarray, *, batch_size: int = 128,
                  device: str | torch.device = "cpu", patient: np.ndarray | None = None,
                  progress: str | None = None, amp: torch.dtype | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The plain view's raw logits (N x classes), pooled image features (N x D) and, for
    a model carrying the Mahalanobis out-of-scope score (``model.scope``), its distances
    (always in float32: ``amp`` applies to the network only)."""
    info = modelinfo.described(info)
    check_views("none", images, info)
    model.eval()
    scope = getattr(model, "scope", None)
    logits, features, distances = [], [], []
    starts = range(0, len(images), batch_size)
    for start in starts if progress is None else bar(starts, desc=progress, unit="batch"):
        batch = normalise(images[start:start + batch_size], info, device)
        extra = [] if patient is None else [torch.as_tensor(patient[start:start + batch_size], device=device)]
        with devices.autocast(device, amp):
            batch_logits, pooled = model.forward_features(batch, *extra)
        pooled = pooled.float()
        logits.append(batch_logits.float().cpu())
        features.append(pooled.cpu())
        if scope is not None:
            distances.append(scope(pooled).cpu())
    if not logits:
        return (np.zeros((0, len(info.classes)), np.float32), np.zeros((0, 0), np.float32),
                None if scope is None else np.zeros(0, np.float32))
    return (torch.cat(logits).numpy(), torch.cat(features).numpy(),
            None if scope is None else torch.cat(distances).numpy())


class TorchPredictor(Predictor):
    """A model file's network, scored on ``device`` in the precision its ``scoring``
    names (``scoring_dtype``; float32 for a file that names none)."""

    def __init__(self, model, info: modelinfo.ModelInfo | dict, device: str | torch.device = "cpu"):
        super().__init__(info)
        self.device = torch.device(device)
        self.model = model.to(self.device)

    @property
    def amp(self) -> torch.dtype | None:
        return scoring_dtype(self.scoring.get("precision", "fp32"), self.device)

    @property
    def reduced(self) -> bool:
        return self.amp is not None

    def exact(self) -> TorchPredictor:
        if not self.reduced:
            return self
        return TorchPredictor(self.model, self.info.replace(scoring={**self.scoring, "precision": "fp32"}), self.device)

    def view_logits(self, images: np.ndarray, *, tta: str, batch_size: int = 128, progress: str | None = None,
                    patient: np.ndarray | None = None) -> np.ndarray:
        return view_logits(self.model, self.info, images, tta=tta, batch_size=batch_size, device=self.device,
                           progress=progress, patient=patient, amp=self.amp)

    def view_outputs(self, images: np.ndarray, *, tta: str, batch_size: int = 128, progress: str | None = None,
                     patient: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        return view_outputs(self.model, self.info, images, tta=tta, batch_size=batch_size, device=self.device,
                            progress=progress, patient=patient, amp=self.amp)

    def plain_outputs(self, images: np.ndarray, *, batch_size: int = 128, patient: np.ndarray | None = None,
                      progress: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        logits, _, distances = plain_outputs(self.model, self.info, images, batch_size=batch_size, device=self.device,
                                             patient=patient, progress=progress, amp=self.amp)
        return logits, distances


def fit_scope(predictor: TorchPredictor, method: str, retention: float, *, train: tuple, val: tuple,
              val_probabilities: np.ndarray, batch_size: int = 128, features: str = "stages"
              ) -> tuple[dict | None, dict]:
    """The out-of-scope score of ``method`` (skinlesion.evaluation.scope) for the
    predictor's model: for mahalanobis, class means and shared precision fitted on the
    ``train`` split's pooled ``features`` (``(images, labels, patient rows)``), attached to
    the model as ``model.scope``; then the threshold keeping ``retention`` of the ``val``
    images (``(images, patient rows)``) in scope, from float32 scores. Returns the model
    file's ``scope`` and the tensors to store (none for msp and energy)."""
    from skinlesion.evaluation import scope

    if method == "none":
        return None, {}
    state = {}
    if method == "mahalanobis":
        state = attach_mahalanobis(predictor, train, batch_size, features)
    images, patient = val
    if method == "msp":
        scores = scope.scores(method, probabilities=val_probabilities)
    else:  # the threshold from float32 scores, as every choice made on validation
        logits, distances = predictor.exact().plain_outputs(images, batch_size=batch_size, patient=patient)
        scores = scope.scores(method, logits=logits, distances=distances)
    described = {"method": method, "threshold": scope.threshold(scores, retention), "retention": retention}
    if method == "mahalanobis":
        described["features"] = features
    return described, state


def attach_mahalanobis(predictor: TorchPredictor, train: tuple, batch_size: int = 128,
                       features: str = "stages") -> dict:
    """Fit the Mahalanobis score's class means and shared precision on the ``train``
    split's pooled ``features`` (``skinlesion.training.models.pool_stages``; the split as
    ``(images, labels, patient rows)``) and attach it to the predictor's model as
    ``model.scope``; returns its tensors, as the model file keeps them."""
    from skinlesion.evaluation import scope
    from skinlesion.training.models import Scope, pool_stages

    pool_stages(predictor.model, features)
    predictor.model.scope = None  # a score fitted before measured other features
    images, labels, patient = train
    _, features, _ = plain_outputs(predictor.model, predictor.info, images, batch_size=batch_size,
                                   device=predictor.device, patient=patient, progress="scope: train features",
                                   amp=predictor.amp)
    means, whitening = scope.fit_mahalanobis(features, labels, len(predictor.classes))
    predictor.model.scope = Scope(torch.from_numpy(means), torch.from_numpy(whitening)).to(predictor.device)
    return {"scope.means": predictor.model.scope.means, "scope.whitening": predictor.model.scope.whitening}

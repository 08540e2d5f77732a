"""Class probabilities from a saved model, scored the way its file says.

A model file written by the calibrate stage carries its ``scoring``: the test-time
augmentation, the logit adjustment and the temperature chosen on validation. Every
consumer (evaluate, explain, the prediction command) goes through ``predict`` here,
so the same model gives the same answer on every path.
"""

from __future__ import annotations

import numpy as np
import torch

from skinlesion import PipelineError
from skinlesion.data import patient
from skinlesion.evaluation import calibrate
from skinlesion.progress import bar
from skinlesion.training import models

TTA = ("none", "flips", "dihedral")


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


def normalise(images: np.ndarray, info: dict, device) -> torch.Tensor:
    """uint8 N x S x S x 3 -> the float tensor the model was trained on."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return models.normalise(batch, info["mean"], info["std"])


def scoring(info: dict) -> dict:
    """The model file's scoring, or the identity (no TTA, no adjustment) for a model
    straight from training."""
    return {**calibrate.IDENTITY, **(info.get("scoring") or {})}


def patient_rows(info: dict, frame) -> np.ndarray | None:
    """The encoded metadata of ``frame``'s rows (age, sex, localization columns) for a
    model that takes it (its file records the encoding), else None."""
    return patient.encode(frame, info["patient"]) if info.get("patient") else None


@torch.no_grad()
def view_logits(model, info: dict, images: np.ndarray, *, tta: str, batch_size: int = 128,
                device: str | torch.device = "cpu", progress: str | None = None,
                patient: np.ndarray | None = None) -> np.ndarray:
    """V x N x classes raw logits, one slice per test-time view of ``tta``; ``patient``:
    the images' encoded metadata, for a model that takes it (the same row for every view)."""
    if tta not in TTA:
        raise PipelineError(f"tta is '{tta}'; expected one of {', '.join(TTA)}")
    size = info["image_size"]
    if images.shape[1:] != (size, size, 3):
        raise PipelineError(f"images are {images.shape[1:]}, the model expects {(size, size, 3)}")
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in starts if progress is None else bar(starts, desc=progress, unit="batch"):
        batch = normalise(images[start:start + batch_size], info, device)
        extra = [] if patient is None else [torch.as_tensor(patient[start:start + batch_size], device=device)]
        out.append(torch.stack([model(view, *extra).float() for view in _views(batch, tta)]).cpu())
    if not out:
        return np.zeros((len(_views(torch.zeros(1, 3, 1, 1), tta)), 0, len(info["classes"])), dtype=np.float32)
    return torch.cat(out, dim=1).numpy()


def predict(model, info: dict, images: np.ndarray, *, batch_size: int = 128, device: str | torch.device = "cpu",
            progress: str | None = None, patient: np.ndarray | None = None) -> np.ndarray:
    """N x classes probabilities for uint8 images at the model's input size, scored as
    the model file says (TTA, logit adjustment, temperature)."""
    how = scoring(info)
    logits = view_logits(model, info, images, tta=how["tta"], batch_size=batch_size, device=device,
                         progress=progress, patient=patient)
    return calibrate.probabilities(logits, how).astype(np.float32)

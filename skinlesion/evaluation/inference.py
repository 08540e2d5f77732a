"""The PyTorch backend of the one scoring path (skinlesion.evaluation.predictor): a
model file's network run on its test-time views, on the CPU or a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from skinlesion.evaluation.predictor import Predictor, check_views, view_count
from skinlesion.progress import bar
from skinlesion.training import models


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


@torch.no_grad()
def view_logits(model, info: dict, images: np.ndarray, *, tta: str, batch_size: int = 128,
                device: str | torch.device = "cpu", progress: str | None = None,
                patient: np.ndarray | None = None) -> np.ndarray:
    """V x N x classes raw logits, one slice per test-time view of ``tta``; ``patient``:
    the images' encoded metadata, for a model that takes it (the same row for every view)."""
    check_views(tta, images, info)
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in starts if progress is None else bar(starts, desc=progress, unit="batch"):
        batch = normalise(images[start:start + batch_size], info, device)
        extra = [] if patient is None else [torch.as_tensor(patient[start:start + batch_size], device=device)]
        out.append(torch.stack([model(view, *extra).float() for view in _views(batch, tta)]).cpu())
    if not out:
        return np.zeros((view_count(tta), 0, len(info["classes"])), dtype=np.float32)
    return torch.cat(out, dim=1).numpy()


class TorchPredictor(Predictor):
    """A model file's network, scored on ``device``."""

    def __init__(self, model, info: dict, device: str | torch.device = "cpu"):
        super().__init__(info)
        self.device = torch.device(device)
        self.model = model.to(self.device)

    def view_logits(self, images: np.ndarray, *, tta: str, batch_size: int = 128, progress: str | None = None,
                    patient: np.ndarray | None = None) -> np.ndarray:
        return view_logits(self.model, self.info, images, tta=tta, batch_size=batch_size, device=self.device,
                           progress=progress, patient=patient)

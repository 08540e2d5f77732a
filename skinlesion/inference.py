"""Class probabilities from a saved model, with optional test-time augmentation."""

from __future__ import annotations

import numpy as np
import torch

from skinlesion import PipelineError
from skinlesion.progress import bar

TTA = ("none", "flips", "dihedral")


def _views(batch: torch.Tensor, tta: str) -> list[torch.Tensor]:
    if tta == "none":
        return [batch]
    views = [batch, batch.flip(3), batch.flip(2), batch.flip(2).flip(3)]
    if tta == "dihedral":
        views += [view.transpose(2, 3) for view in views]
    return views


def normalise(images: np.ndarray, info: dict, device) -> torch.Tensor:
    """uint8 N x S x S x 3 -> the float tensor the model was trained on."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(info["mean"], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(info["std"], device=device).view(1, 3, 1, 1) * 255
    return (batch - mean) / std


@torch.no_grad()
def predict(model, info: dict, images: np.ndarray, *, batch_size: int = 128, tta: str = "none",
            device: str | torch.device = "cpu", progress: str | None = None) -> np.ndarray:
    """N x classes probabilities for uint8 images at the model's input size; with
    ``tta`` the softmax is averaged over flipped (or all eight dihedral) views."""
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
        views = _views(batch, tta)
        out.append(torch.stack([model(view).float().softmax(dim=1) for view in views]).mean(0).cpu())
    if not out:
        return np.zeros((0, len(info["classes"])), dtype=np.float32)
    return torch.cat(out).numpy()

"""Losses for imbalanced classes: cross-entropy or focal, optionally class-weighted,
with label smoothing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skinlesion import CLASSES, PipelineError


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (k * n_c)``: each class then carries the same total weight."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        missing = ", ".join(CLASSES[i] if num_classes == len(CLASSES) else str(i) for i in np.flatnonzero(counts == 0))
        raise PipelineError(f"class(es) {missing} have no training image; class weights are undefined")
    return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by ``(1 - p_t)^gamma`` so
    that easy, confident examples (most nevi) count less."""

    def __init__(self, gamma: float, weight: torch.Tensor | None, label_smoothing: float):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = logits.float().log_softmax(dim=1)
        ce = F.nll_loss(log_p, target, reduction="none")
        if self.label_smoothing:
            ce = (1 - self.label_smoothing) * ce - self.label_smoothing * log_p.mean(dim=1)
        p_t = log_p.gather(1, target[:, None]).squeeze(1).exp()
        loss = (1 - p_t) ** self.gamma * ce
        if self.weight is not None:
            w = self.weight[target]
            return (w * loss).sum() / w.sum()
        return loss.mean()


class LogitAdjusted(nn.Module):
    """The logit-adjusted loss of Menon et al. (ICLR 2021): the wrapped loss sees
    ``logits + tau * log(prior)``, so the network itself learns prior-free scores
    whose argmax targets balanced error, without re-weighting or re-sampling."""

    def __init__(self, loss: nn.Module, offsets: torch.Tensor):
        super().__init__()
        self.loss = loss
        self.register_buffer("offsets", offsets)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits + self.offsets, target)


def build(name: str, *, weighted: bool, label_smoothing: float, gamma: float, labels: np.ndarray,
          num_classes: int, logit_adjust: float = 0.0, prior: np.ndarray | None = None) -> nn.Module:
    """The training loss; with ``logit_adjust`` > 0, logit-adjusted by ``prior`` (the
    class shares the sampler actually draws)."""
    loss = _base(name, weighted=weighted, label_smoothing=label_smoothing, gamma=gamma, labels=labels,
                 num_classes=num_classes)
    if not logit_adjust:
        return loss
    prior = np.asarray(prior, dtype=np.float64)
    return LogitAdjusted(loss, torch.tensor(logit_adjust * np.log(prior / prior.sum()), dtype=torch.float32))


def _base(name: str, *, weighted: bool, label_smoothing: float, gamma: float, labels: np.ndarray,
          num_classes: int) -> nn.Module:
    weight = class_weights(labels, num_classes) if weighted else None
    if name == "focal":
        return FocalLoss(gamma, weight, label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

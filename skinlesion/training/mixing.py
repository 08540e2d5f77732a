"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on whole training batches.

Each batch is paired with a shuffled copy of itself. Mixup blends the two images by
a weight ``lam`` drawn from Beta(alpha, alpha); CutMix pastes one box of the partner
into each image, ``1 - lam`` of its area. The loss is the same mix of the two
targets' losses: ``lam * loss(y) + (1 - lam) * loss(y_partner)``.

With both alphas above 0, each batch is mixed one way or the other, half the time
each (timm's convention). The patient's metadata is blended with the same ``lam`` as
the image, so the rows beside each image say what its mixed target says.

The class-balanced sampler needs nothing more: partners are drawn from the same
balanced batch, so every class still appears equally often in the targets, and the
sampled prior that a logit-adjusted loss corrects for is unchanged. The draws come
from a generator seeded by (seed, epoch), so a resumed run mixes exactly as an
uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skinlesion.files import stable_seed


@dataclass
class Mixed:
    images: torch.Tensor
    patient: list[torch.Tensor]  # [] or [the blended metadata rows]
    partner: torch.Tensor        # the partner's labels
    lam: float                   # the weight of the batch's own labels


def cut_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Rows y0:y1 and columns x0:x1 of a box of about ``1 - lam`` of the image,
    centred anywhere in it (clipped at the edges, as in the CutMix paper)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(round(height * ratio)), int(round(width * ratio))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h - cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w - cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


class Mixer:
    """Mixes the batches of one epoch; ``mixup`` and ``cutmix`` are the Beta alphas
    (0: off)."""

    def __init__(self, mixup: float, cutmix: float, seed: int, epoch: int):
        self.mixup, self.cutmix = float(mixup), float(cutmix)
        self.rng = np.random.default_rng(stable_seed(seed, "mix", epoch))
        self.generator = torch.Generator().manual_seed(stable_seed(seed, "mix-pairs", epoch))

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, patient: list[torch.Tensor]) -> Mixed:
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or self.rng.random() < 0.5)
        lam = float(self.rng.beta(*(2 * [self.cutmix if use_cutmix else self.mixup])))
        pairs = torch.randperm(len(images), generator=self.generator).to(images.device)
        if use_cutmix:
            y0, y1, x0, x1 = cut_box(images.shape[2], images.shape[3], lam, self.rng)
            images = images.clone()
            images[:, :, y0:y1, x0:x1] = images[pairs][:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[2] * images.shape[3])  # the box as clipped
        else:
            images = lam * images + (1 - lam) * images[pairs]
        patient = [lam * rows + (1 - lam) * rows[pairs] for rows in patient]
        return Mixed(images, patient, labels[pairs], lam)


def mixed_loss(criterion, logits: torch.Tensor, labels: torch.Tensor, mixed: Mixed) -> torch.Tensor:
    """The loss of a mixed batch: the mix of its two targets' losses."""
    return mixed.lam * criterion(logits, labels) + (1 - mixed.lam) * criterion(logits, mixed.partner)

"""Batches straight from decoded uint8 arrays.

The prepared and balanced images already sit decoded at the working size, so a
batch is an index into an array: no JPEG decoding, no worker processes. The
per-sample augmentation that helps a CNN most here, the eight flips/rotations
of the dihedral group (a lesion has no "up"), runs on whole batches as tensor
ops, on the GPU when there is one.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from skinlesion.files import stable_seed
from skinlesion.training.models import normalise

# "strong": the flips plus, per sample, a rotation by any angle, a zoom into the
# image, a shift, and brightness/contrast/saturation jitter (ranges below).
ZOOM = (1.0, 1.25)
SHIFT = 0.08         # fraction of the side, either way
JITTER = 0.2         # brightness, contrast and saturation factors in 1 +- JITTER
GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights


def dihedral(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips and (square images) transposes, per sample."""
    draws = torch.randint(0, 2, (3, len(batch)), generator=generator).bool().to(batch.device)
    shape = (-1, 1, 1, 1)
    batch = torch.where(draws[0].view(shape), batch.flip(3), batch)
    batch = torch.where(draws[1].view(shape), batch.flip(2), batch)
    if batch.shape[2] == batch.shape[3]:
        batch = torch.where(draws[2].view(shape), batch.transpose(2, 3), batch)
    return batch


def affine_and_colour(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per sample: a random reflection, a rotation by any angle, a zoom and a shift
    (reflected borders), then brightness, saturation and contrast jitter, on a float
    batch in 0..255, N x 3 x H x W.

    The reflection and any-angle rotation already cover the eight flips/turns, so
    the geometry is one ``grid_sample``; the colour jitter is folded into one
    per-sample blend of the image, its grey version and its mean grey:
    contrast(saturation(brightness(x))) = a*x + b*grey(x) + c."""
    n = len(batch)
    draws = torch.rand((8, n), generator=generator, dtype=torch.float32).to(batch.device)
    angle = draws[0] * 2 * torch.pi
    scale = 1 / (ZOOM[0] + draws[1] * (ZOOM[1] - ZOOM[0]))
    shift = (draws[2:4] * 2 - 1) * SHIFT * 2  # affine_grid spans -1..1
    mirror = torch.where(draws[7] < 0.5, -1.0, 1.0)  # x -> -x before the rotation
    cos, sin = scale * angle.cos(), scale * angle.sin()
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[0]], 1),
                         torch.stack([sin * mirror, cos, shift[1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(batch.shape), align_corners=False)
    batch = torch.nn.functional.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection",
                                            align_corners=False)
    brightness, contrast, saturation = (1 + (draws[4:7] * 2 - 1) * JITTER).view(3, n, 1, 1, 1)
    grey = torch.einsum("nchw,c->nhw", batch, GREY.to(batch.device)).unsqueeze(1)
    a = contrast * saturation * brightness
    b = contrast * (1 - saturation) * brightness
    c = (1 - contrast) * brightness * grey.mean(dim=(2, 3), keepdim=True)
    return torch.addcmul(c, a, batch).add_(b * grey).clamp_(0, 255)


def shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s share of ``order``: every ``world``-th index from ``rank`` on,
    after padding with the first indices so every rank gets as many."""
    if world == 1:
        return order
    return torch.cat([order, order[: (-len(order)) % world]])[rank::world]


class ArrayLoader:
    """Iterates ``(images, labels)`` batches: float, normalised, N x 3 x S x S; with
    ``patient`` (one encoded metadata row per image), ``(images, labels, patient)``.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run
    draws exactly the batches an uninterrupted one would have. With ``world`` > 1
    (distributed training) every rank draws the same order and takes every
    ``world``-th index from ``rank`` on, padded so all ranks get as many.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int, mean, std,
                 device: torch.device, shuffle: bool = False, augment: str = "none", seed: int = 0,
                 weights: np.ndarray | None = None, rank: int = 0, world: int = 1,
                 patient: np.ndarray | None = None, prefetch: bool | None = None):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        # prefetch: one batch ahead on a second CUDA stream (default: on CUDA; elsewhere it
        # only looks ahead, which the tests use to check the batches are the same)
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch
        self.patient = None if patient is None else torch.as_tensor(np.asarray(patient, dtype=np.float32))
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.rank, self.world = rank, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        per_rank = -(-len(self.images) // self.world)
        return -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in batch order."""
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "order", self.epoch))
        if self.weights is not None:  # class-balanced sampling, with replacement
            order = torch.multinomial(self.weights, len(self.images), replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(len(self.images), generator=generator)
        else:
            order = torch.arange(len(self.images))
        return shard(order, self.rank, self.world)

    def _batches(self):
        order = self.order()
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "augment", self.epoch))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index]
            if self.device.type == "cuda":  # a gathered batch is pageable memory: pin it, so the copy is async
                images = images.pin_memory()
            batch = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            if self.augment == "flips":
                batch = dihedral(batch, generator)
            elif self.augment == "strong":
                batch = affine_and_colour(batch, generator)
            batch = normalise(batch, self.mean, self.std)
            labels = self.labels[index].to(self.device, non_blocking=True)
            if self.patient is None:
                yield batch, labels
            else:
                yield batch, labels, self.patient[index].to(self.device, non_blocking=True)

    def __iter__(self):
        if not self.prefetch:
            yield from self._batches()
            return
        # One batch ahead: while the step runs on batch k, batch k+1 is gathered, copied
        # and augmented, on a second CUDA stream where there is one. The batches and
        # their order are the loader's own (the augmentation draws in the same order).
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        batches = self._batches()

        def fetch():
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                return next(batches, None)

        ahead = fetch()
        while ahead is not None:
            if stream is not None:
                current_stream = torch.cuda.current_stream(self.device)
                current_stream.wait_stream(stream)
                for tensor in ahead:
                    tensor.record_stream(current_stream)  # made on the side stream, used on this one
            current, ahead = ahead, fetch()
            yield current

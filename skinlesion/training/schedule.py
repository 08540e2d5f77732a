"""The optimiser and the per-batch learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

class Schedule:
    """Per-batch learning rate: linear warm-up, then constant (``none``), cosine decay,
    one-cycle (torch's OneCycleLR, its warm-up from the same param), or reduce-on-
    plateau (halved after 2 epochs without a better validation score)."""

    def __init__(self, optimizer, kind: str, lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int):
        self.optimizer, self.kind, self.lr = optimizer, kind, lr
        self.total = epochs * steps_per_epoch
        self.warmup = min(warmup_epochs * steps_per_epoch, self.total - 1)
        self.step_count, self.factor, self.best, self.stale = 0, 1.0, -math.inf, 0
        self.onecycle = None
        if kind == "onecycle" and self.total >= 3:
            # OneCycleLR divides by zero unless its rise lasts 2 steps or more and its
            # fall at least one; a run of 1 or 2 batches keeps the warm-up-then-constant rate.
            self.onecycle = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=lr, total_steps=self.total,
                pct_start=max(self.warmup, 2) / self.total, anneal_strategy="cos")
        else:
            self._apply()

    def current(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _apply(self) -> None:
        step = self.step_count
        if step < self.warmup:
            lr = self.lr * (step + 1) / (self.warmup + 1)
        elif self.kind == "cosine":
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            lr = self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        else:
            lr = self.lr * self.factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def batch_end(self) -> None:
        self.step_count += 1
        if self.onecycle is not None:
            if self.step_count < self.total:
                self.onecycle.step()
        else:
            self._apply()

    def epoch_end(self, score: float) -> None:
        if self.kind != "plateau" or self.step_count < self.warmup:
            return
        if score > self.best:
            self.best, self.stale = score, 0
        else:
            self.stale += 1
            if self.stale >= 2:
                self.factor, self.stale = self.factor * 0.5, 0
                log.info("validation score on a plateau: learning rate halved to %.2e", self.lr * self.factor)
        self._apply()

    def state_dict(self) -> dict:
        state = {"step_count": self.step_count, "factor": self.factor, "best": self.best, "stale": self.stale}
        if self.onecycle is not None:
            state["onecycle"] = self.onecycle.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.factor, self.best, self.stale = (state["step_count"], state["factor"],
                                                               state["best"], state["stale"])
        if self.onecycle is not None:
            self.onecycle.load_state_dict(state["onecycle"])


def make_optimizer(name: str, parameters, lr: float, weight_decay: float, momentum: float):
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=momentum > 0)

"""Where training runs and in what precision, and seeding for repeatable runs."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from skinlesion import PipelineError


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX-512 BF16 or AMX): there, bf16
    autocast nearly doubles a ResNet training step; elsewhere it is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (None: plain fp32)."""
    if precision == "fp32" or device.type == "mps" and precision == "auto":
        return None
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise PipelineError("train.precision is bf16 but this GPU has no bfloat16; use auto or fp16")
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    return torch.bfloat16


def autocast(device, amp: torch.dtype | None):
    """Autocast to ``amp`` on ``device``'s type, or plain float32 for None."""
    return torch.autocast(torch.device(device).type, dtype=amp or torch.bfloat16, enabled=amp is not None)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"train.device is '{name}'; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is cuda but no CUDA GPU is visible; use train.device=auto")
    return device


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)

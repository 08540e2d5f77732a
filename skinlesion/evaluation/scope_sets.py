"""Images that are not dermatoscopic lesions, to measure the out-of-scope score on:
none of them is seen by training or by the threshold.

- ``patterns``: generated non-lesion images: checkerboards, stripes, gradients, flat
  colours, noise, rings and blocks of random colours (the kind of input a page gets by
  mistake: a test card, a screenshot, a diagram);
- ``corrupted``: the test split's lesions made unusable: colours inverted, blurred,
  drowned in noise, posterised, nearly black, washed out.

Both are drawn from a fixed seed, so every run measures the same images."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

PATTERNS = ("checkerboard", "stripes", "gradient", "flat", "noise", "rings", "blocks")
CORRUPTIONS = ("inverted", "blurred", "noisy", "posterised", "dark", "washed_out")


def _colours(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, (count, 3)).astype(np.float32)


def pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` x ``size`` RGB uint8 image of ``kind``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = _colours(rng, 2)
    if kind == "checkerboard":
        cells = rng.integers(2, 12)
        mask = ((np.floor(x * cells) + np.floor(y * cells)) % 2)[..., None]
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        mask = (np.sin((x * np.cos(angle) + y * np.sin(angle)) * rng.uniform(6, 40)) > 0)[..., None]
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        mask = np.clip(0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle), 0, 1)[..., None]
    elif kind == "flat":
        mask = np.zeros((size, size, 1), np.float32)
    elif kind == "noise":
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    elif kind == "rings":
        radius = np.hypot(x - rng.uniform(0.2, 0.8), y - rng.uniform(0.2, 0.8))
        mask = (np.sin(radius * rng.uniform(15, 60)) > 0)[..., None]
    elif kind == "blocks":
        image = np.zeros((size, size, 3), np.float32) + a
        for _ in range(rng.integers(3, 12)):
            top, left = rng.integers(0, size, 2)
            height, width = rng.integers(size // 10, size // 2, 2)
            image[top:top + height, left:left + width] = _colours(rng, 1)[0]
        return image.astype(np.uint8)
    else:
        raise ValueError(kind)
    return (a * (1 - mask) + b * mask).astype(np.uint8)


def patterns(size: int, per_kind: int = 15, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``per_kind`` generated images of every kind in ``PATTERNS``, and their kinds;
    the first checkerboard is blue and yellow."""
    rng = np.random.default_rng(seed)
    images, kinds = [], []
    for kind in PATTERNS:
        for _ in range(per_kind):
            images.append(pattern(kind, size, rng))
            kinds.append(kind)
    first = kinds.index("checkerboard")
    y, x = np.mgrid[0:size, 0:size] * 8 // size
    images[first] = np.where((((x + y) % 2) == 1)[..., None], [255, 220, 0], [20, 60, 200]).astype(np.uint8)
    return np.stack(images), kinds


def corrupt(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    pixels = image.astype(np.float32)
    if kind == "inverted":
        out = 255 - pixels
    elif kind == "blurred":
        out = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=image.shape[0] / 12)),
                         dtype=np.float32)
    elif kind == "noisy":
        out = pixels + rng.normal(0, 80, pixels.shape)
    elif kind == "posterised":
        out = (pixels // 128) * 128 + 64
    elif kind == "dark":
        out = pixels * 0.08
    elif kind == "washed_out":
        out = 200 + pixels * 0.2
    else:
        raise ValueError(kind)
    return np.clip(out, 0, 255).astype(np.uint8)


def corrupted(images: np.ndarray, per_kind: int = 30, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``per_kind`` of ``images`` (drawn without replacement) under every corruption."""
    rng = np.random.default_rng(seed)
    out, kinds = [], []
    for kind in CORRUPTIONS:
        for index in rng.choice(len(images), min(per_kind, len(images)), replace=False):
            out.append(corrupt(images[index], kind, rng))
            kinds.append(kind)
    return np.stack(out), kinds


def measure(predictor, inside: np.ndarray, inside_patient, sets: dict[str, tuple[np.ndarray, list[str]]], *,
            batch_size: int = 128, retention: float = 0.95) -> tuple[dict, dict]:
    """Every candidate score (``skinlesion.evaluation.scope.METHODS``) on the
    in-distribution images ``inside`` and on each out-of-scope set (``{name: (images,
    kinds)}``, scored with unknown patient metadata for a model that takes it); the
    separation per set and candidate (and, for the model's own method, the shares each
    side of its threshold), and every image's scores (for the plots)."""
    from skinlesion.evaluation import scope

    def candidates(images, patient) -> dict[str, np.ndarray]:
        probabilities = predictor.probabilities(images, batch_size=batch_size, patient=patient)
        logits, distances = predictor.plain_outputs(images, batch_size=batch_size, patient=patient)
        return {"msp": scope.scores("msp", probabilities=probabilities),
                "energy": scope.scores("energy", logits=logits),
                "mahalanobis": scope.scores("mahalanobis", distances=distances)}

    own = predictor.info.get("scope") or {}
    scored = {"test": candidates(inside, inside_patient)}
    result: dict = {"method": own.get("method"), "threshold": own.get("threshold"), "sets": {}}
    for name, (images, kinds) in sets.items():
        patient = unknown_patient(predictor, len(images))
        scored[name] = candidates(images, patient)
        result["sets"][name] = {method: scope.separation(scored["test"][method], scored[name][method],
                                                         own.get("threshold") if method == own.get("method") else None,
                                                         retention)
                                for method in scope.METHODS}
        if own.get("method"):
            caught = scored[name][own["method"]] > own["threshold"]
            result["sets"][name]["caught_by_kind"] = {
                kind: round(float(caught[[k == kind for k in kinds]].mean()), 4) for kind in sorted(set(kinds))}
    if own.get("method"):
        result["test_kept"] = round(float((scored["test"][own["method"]] <= own["threshold"]).mean()), 4)
    return result, scored


def unknown_patient(predictor, count: int):
    """Metadata rows saying "unknown" for age, sex and site, for a model that takes them."""
    if not predictor.takes_patient:
        return None
    import pandas as pd

    return predictor.patient_rows(pd.DataFrame({"age": [""] * count, "sex": ["unknown"] * count,
                                                "localization": ["unknown"] * count}))

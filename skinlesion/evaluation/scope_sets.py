"""Images that are not usable dermatoscopic lesions, to measure the out-of-scope score
on: none of them is seen by training or by the threshold.

- ``far``: natural photographs that installed packages ship (scikit-image's bundled
  images, scikit-learn's sample images, matplotlib's sample data), whole and as
  random crops, and generated images: noise, flat colours, gradients, rendered text,
  checkerboards (the first one blue and yellow), stripes, rings and blocks (the kind
  of input a page gets by mistake: a photo, a screenshot, a test card);
- ``near``: the test split's own images made unusable: heavy blur, over- and
  under-exposure, JPEG quality 5, a 10 % crop blown up, greyscale, and the lesion
  masks themselves.

Both are drawn from a fixed seed, so every run measures the same images."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from skinlesion import PipelineError

GENERATED = ("noise", "flat", "gradient", "text", "checkerboard", "stripes", "rings", "blocks")
CORRUPTIONS = ("blurred", "over_exposed", "under_exposed", "jpeg_5", "crop_10", "greyscale", "mask")
SKIMAGE = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
           "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
           "moon", "page", "retina", "rocket", "text", "shepp_logan_phantom")
WORDS = ("Invoice 2024", "Settings", "Lorem ipsum dolor", "Figure 3", "Total: 42", "OK", "Cancel", "README")


def _rgb(array: np.ndarray) -> np.ndarray:
    """Any image array (grey, RGB, RGBA; any dtype) as uint8 RGB; RGBA over white."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = array.astype(np.float64)
        span = array.max() - array.min()
        array = ((array - array.min()) / (span if span else 1) * 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4].astype(np.float32) / 255
        array = (array[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return array[..., :3]


def photographs() -> list[tuple[str, np.ndarray]]:
    """The natural photographs the installed packages ship, by name."""
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images

    found = [(name, _rgb(getattr(skimage.data, name)())) for name in SKIMAGE]
    sample = load_sample_images()
    found += [(Path(name).stem, _rgb(image)) for name, image in zip(sample.filenames, sample.images)]
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        if (folder / name).is_file():
            found.append((Path(name).stem, _rgb(np.asarray(Image.open(folder / name)))))
    return found


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def _colours(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, (count, 3)).astype(np.float32)


def generated(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` x ``size`` RGB uint8 image of ``kind``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = _colours(rng, 2)
    if kind == "noise":
        if rng.random() < 0.5:
            return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        return np.clip(rng.normal(128, 50, (size, size, 3)), 0, 255).astype(np.uint8)
    if kind == "text":
        image = Image.new("RGB", (size, size), tuple(int(v) for v in a))
        draw = ImageDraw.Draw(image)
        for line in range(rng.integers(2, 7)):
            draw.text((int(rng.integers(0, size // 4)), int(line * size / 7 + rng.integers(0, 4))),
                      str(rng.choice(WORDS)), fill=tuple(int(v) for v in b))
        return np.asarray(image)
    if kind == "blocks":
        image = np.zeros((size, size, 3), np.float32) + a
        for _ in range(rng.integers(3, 12)):
            top, left = rng.integers(0, size, 2)
            height, width = rng.integers(max(size // 10, 1), max(size // 2, 2), 2)
            image[top:top + height, left:left + width] = _colours(rng, 1)[0]
        return image.astype(np.uint8)
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
    elif kind == "rings":
        radius = np.hypot(x - rng.uniform(0.2, 0.8), y - rng.uniform(0.2, 0.8))
        mask = (np.sin(radius * rng.uniform(15, 60)) > 0)[..., None]
    else:
        raise ValueError(kind)
    return (a * (1 - mask) + b * mask).astype(np.uint8)


def far(size: int, per_kind: int = 15, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The far set: every bundled photograph whole and as two random crops (kind
    ``photo``), then ``per_kind`` generated images of every kind in ``GENERATED``."""
    rng = np.random.default_rng(seed)
    images, kinds = [], []
    for _, photo in photographs():
        images.append(_resized(photo, size))
        height, width = photo.shape[:2]
        for _ in range(2):
            side = int(min(height, width) * rng.uniform(0.3, 0.7))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            images.append(_resized(np.ascontiguousarray(photo[top:top + side, left:left + side]), size))
        kinds += ["photo"] * 3
    for kind in GENERATED:
        for _ in range(per_kind):
            images.append(generated(kind, size, rng))
            kinds.append(kind)
    first = kinds.index("checkerboard")
    y, x = np.mgrid[0:size, 0:size] * 8 // size
    images[first] = np.where((((x + y) % 2) == 1)[..., None], [255, 220, 0], [20, 60, 200]).astype(np.uint8)
    return np.stack(images), kinds


def corrupt(image: np.ndarray, kind: str, rng: np.random.Generator, mask: np.ndarray | None = None) -> np.ndarray:
    pixels = image.astype(np.float32)
    side = image.shape[0]
    if kind == "blurred":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=side / 10)))
    if kind == "over_exposed":
        out = pixels * 3.0 + 60
    elif kind == "under_exposed":
        out = pixels * 0.12
    elif kind == "jpeg_5":
        buffer = BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=5)
        return np.asarray(Image.open(BytesIO(buffer.getvalue())).convert("RGB"))
    elif kind == "crop_10":  # a tenth of the image's area, blown up to the whole
        crop = max(int(round(side * 0.1 ** 0.5)), 1)
        top, left = rng.integers(0, side - crop + 1, 2)
        return _resized(np.ascontiguousarray(image[top:top + crop, left:left + crop]), side)
    elif kind == "greyscale":
        out = np.repeat((pixels @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], 3, axis=-1)
    elif kind == "mask":
        out = np.repeat((np.asarray(mask) > 0)[..., None].astype(np.float32) * 255, 3, axis=-1)
    else:
        raise ValueError(kind)
    return np.clip(out, 0, 255).astype(np.uint8)


def near(images: np.ndarray, masks: np.ndarray, has_mask: np.ndarray, per_kind: int = 15,
         seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``per_kind`` of the test ``images`` (drawn without replacement) under every
    corruption; ``mask`` takes the lesion masks of images that have one."""
    rng = np.random.default_rng(seed)
    out, kinds = [], []
    for kind in CORRUPTIONS:
        pool = np.flatnonzero(has_mask) if kind == "mask" else np.arange(len(images))
        for index in rng.choice(pool, min(per_kind, len(pool)), replace=False):
            out.append(corrupt(images[index], kind, rng, masks[index] if kind == "mask" else None))
            kinds.append(kind)
    return np.stack(out), kinds


def measure(predictor, inside: np.ndarray, inside_patient, sets: dict[str, tuple[np.ndarray, list[str]]], *,
            batch_size: int = 128, retention: float = 0.95,
            inside_scores: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """Every candidate score (``skinlesion.evaluation.scope.METHODS``) on the
    in-distribution images ``inside`` and on each out-of-scope set (``{name: (images,
    kinds)}``, scored with unknown patient metadata for a model that takes it); the
    separation per set and candidate (and, for the model's own method, the shares each
    side of its threshold), and every image's scores (for the plots). ``inside_scores``:
    the candidates of ``inside`` as already scored (``scope.candidates``), not scored again."""
    from skinlesion.evaluation import calibrate, scope

    flags: dict[str, np.ndarray | None] = {}

    def candidates(name, images, patient) -> dict[str, np.ndarray]:
        # one pass: the views' logits, and the distances of their plain (first) view
        logits, distances = predictor.outputs(images, batch_size=batch_size, patient=patient)
        probabilities = calibrate.probabilities(logits, predictor.scoring).astype(np.float32)
        flags[name] = predictor.melanoma_flags(probabilities)
        return scope.candidates(logits, probabilities, distances)

    own = predictor.info.scope
    method_own, threshold_own = (None, None) if own is None else (own.method, own.threshold)
    if inside_scores is not None and set(inside_scores) != set(scope.METHODS):
        raise PipelineError(f"the in-distribution scores hold {', '.join(sorted(inside_scores))}, "
                            f"not every candidate ({', '.join(scope.METHODS)})")
    scored = {"test": inside_scores if inside_scores is not None else candidates("test", inside, inside_patient)}
    result: dict = {"method": method_own, "threshold": threshold_own, "sets": {}}
    for name, (images, kinds) in sets.items():
        patient = unknown_patient(predictor, len(images))
        scored[name] = candidates(name, images, patient)
        result["sets"][name] = {method: scope.separation(scored["test"][method], scored[name][method],
                                                         threshold_own if method == method_own else None,
                                                         retention)
                                for method in scope.METHODS}
        caught = scored[name][method_own] > threshold_own if method_own else np.zeros(len(images), bool)
        if method_own:
            result["sets"][name]["caught_by_kind"] = {
                kind: round(float(caught[[k == kind for k in kinds]].mean()), 4) for kind in sorted(set(kinds))}
        if flags[name] is not None:  # a melanoma flag on an image that is no lesion: what the score must prevent
            result["sets"][name]["melanoma_flag_without_scope"] = round(float(flags[name].mean()), 4)
            result["sets"][name]["melanoma_flag"] = round(float((flags[name] & ~caught).mean()), 4)
            # which kinds raised it, past the score: a pattern should never pass as a melanoma
            raised = flags[name] & ~caught
            result["sets"][name]["melanoma_flag_by_kind"] = {
                kind: int(raised[[k == kind for k in kinds]].sum()) for kind in sorted(set(kinds))}
    if method_own:
        result["test_kept"] = round(float((scored["test"][method_own] <= threshold_own).mean()), 4)
    return result, scored


def unknown_patient(predictor, count: int):
    """Metadata rows saying "unknown" for age, sex and site, for a model that takes them."""
    if not predictor.takes_patient:
        return None
    import pandas as pd

    return predictor.patient_rows(pd.DataFrame({"age": [""] * count, "sex": ["unknown"] * count,
                                                "localization": ["unknown"] * count}))

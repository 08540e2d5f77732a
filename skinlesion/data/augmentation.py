"""Image augmentation (albumentations), reproducible image by image."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from skinlesion.files import stable_seed  # noqa: E402
from skinlesion.params import Augment  # noqa: E402


def build(params: Augment) -> A.Compose:
    """A pipeline from the ``augment`` params: rotation (degrees), scale and shift
    (fractions), flips, brightness/contrast (fractions), hue/saturation (shifts)."""
    transforms = [
        A.Affine(rotate=(-params.rotate, params.rotate),
                 scale=(1 - params.scale, 1 + params.scale),
                 translate_percent=(-params.shift, params.shift),
                 border_mode=cv2.BORDER_REFLECT_101, p=1.0),
    ]
    if params.hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if params.vflip:
        transforms.append(A.VerticalFlip(p=0.5))
    transforms.append(A.RandomBrightnessContrast(brightness_limit=params.brightness,
                                                 contrast_limit=params.contrast, p=1.0))
    if params.hue or params.saturation:
        transforms.append(A.HueSaturationValue(hue_shift_limit=params.hue,
                                               sat_shift_limit=params.saturation,
                                               val_shift_limit=0, p=1.0))
    return A.Compose(transforms, seed=0)


def augment(pipeline: A.Compose, image: np.ndarray, *seed_parts) -> np.ndarray:
    """Apply ``pipeline`` with randomness fixed by ``seed_parts`` alone, so a copy
    comes out the same whatever order or process makes it."""
    pipeline.set_random_seed(stable_seed(*seed_parts))
    return pipeline(image=np.ascontiguousarray(image))["image"]

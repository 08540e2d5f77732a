"""Rebalance the training split on disk: the notebooks' recipe, without the leak.

Only the train split is touched, after the split, so no augmented copy of a
validation or test lesion can reach training. ``threshold`` brings every class to
``target_per_class``: larger classes are downsampled (one image per lesion first,
for variety), smaller ones are filled with augmented copies of their own images.
``none`` keeps the train split as it is.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from skinlesion import CLASSES, PipelineError
from skinlesion.data.augmentation import augment, build
from skinlesion.files import stable_seed
from skinlesion.params import Augment
from skinlesion.progress import bar

log = logging.getLogger(__name__)

PLAN_COLUMNS = ["image_id", "lesion_id", "dx", "label", "augmented", "copy"]


def _plan_none(train: pd.DataFrame, target: int, seed: int) -> pd.DataFrame:
    return train.assign(augmented=0, copy=0)


def _plan_threshold(train: pd.DataFrame, target: int, seed: int) -> pd.DataFrame:
    parts = []
    for dx in CLASSES:
        images = train[train["dx"] == dx].sort_values("image_id", kind="stable").reset_index(drop=True)
        rng = np.random.default_rng(stable_seed(seed, dx))
        order = images.iloc[rng.permutation(len(images))]
        if len(images) >= target:
            # The k-th image of a lesion ranks after every lesion's (k-1)-th: distinct lesions first.
            rank = order.groupby("lesion_id", sort=False).cumcount()
            kept = order.assign(_rank=rank.values).sort_values("_rank", kind="stable").head(target)
            parts.append(kept.drop(columns="_rank").assign(augmented=0, copy=0))
        else:
            parts.append(images.assign(augmented=0, copy=0))
            extra = target - len(images)
            sources = order.iloc[np.arange(extra) % len(images)]
            parts.append(sources.assign(augmented=1, copy=np.arange(extra) // len(images) + 1))
    return pd.concat(parts, ignore_index=True)


STRATEGIES = {"none": _plan_none, "threshold": _plan_threshold}


def plan(train: pd.DataFrame, strategy: str, target, seed: int) -> pd.DataFrame:
    """Which images the balanced set holds: originals (``augmented`` 0) and augmented
    copies (``augmented`` 1, ``copy`` k = the k-th copy of that image)."""
    empty = [dx for dx in CLASSES if not (train["dx"] == dx).any()]
    if empty:
        raise PipelineError(f"the train split has no image of class(es) {', '.join(empty)}; cannot balance")
    result = STRATEGIES[strategy](train, target, seed)
    result["dx_order"] = result["dx"].map(CLASSES.index)
    result = result.sort_values(["dx_order", "augmented", "image_id", "copy"], kind="stable")
    return result.loc[:, PLAN_COLUMNS].reset_index(drop=True)


def render(planned: pd.DataFrame, images: np.ndarray, rows: np.ndarray, augment_params: Augment,
           seed: int) -> np.ndarray:
    """The balanced images, in plan order: originals copied, copies augmented."""
    pipeline = build(augment_params)
    out = np.empty((len(planned), *images.shape[1:]), dtype=np.uint8)
    for position, (row, item) in enumerate(bar(zip(rows, planned.itertuples(index=False)),
                                               total=len(planned), desc="balance", unit="img")):
        if item.augmented:
            out[position] = augment(pipeline, images[row], seed, item.image_id, item.copy)
        else:
            out[position] = images[row]
    return out


def summary(train: pd.DataFrame, planned: pd.DataFrame, strategy: str) -> dict:
    before = train["dx"].value_counts()
    after = planned["dx"].value_counts()
    augmented = planned.loc[planned["augmented"] == 1, "dx"].value_counts()
    return {
        "strategy": strategy,
        "images": len(planned),
        "before": {dx: int(before.get(dx, 0)) for dx in CLASSES},
        "after": {dx: int(after.get(dx, 0)) for dx in CLASSES},
        "augmented": {dx: int(augmented.get(dx, 0)) for dx in CLASSES},
    }

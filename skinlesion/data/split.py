"""Train/validation/test split, stratified by diagnosis and grouped by lesion.

HAM10000 has 10,015 images of 7,470 lesions: splitting images instead of lesions
puts near-identical photographs of one lesion on both sides and inflates every
score. Lesions are split, stratified by their diagnosis, and their images follow.
"""

from __future__ import annotations

from itertools import combinations

import pandas as pd
from sklearn.model_selection import train_test_split

from skinlesion import CLASSES, PipelineError

SPLITS = ("train", "val", "test")


def split(frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
          group_by: str = "lesion") -> dict[str, pd.DataFrame]:
    """Return the image manifests {train, val, test}, each sorted by image_id with
    columns image_id, lesion_id, dx, label and the patient's age, sex and localization
    (for ``train.metadata``; blank where the source has none).

    ``group_by="image"`` splits images as if each were its own lesion: the common,
    leaky protocol, kept only to measure what it inflates."""
    key = "lesion_id" if group_by == "lesion" else "image_id"
    lesions = frame.groupby(key)["dx"].first().sort_index()
    per_class = lesions.value_counts()
    too_few = [f"{dx} ({per_class.get(dx, 0)})" for dx in CLASSES if per_class.get(dx, 0) < 3]
    if too_few:
        raise PipelineError(f"classes with fewer than 3 lesions cannot be split three ways: {', '.join(too_few)}")
    count = len(lesions)
    test_count, val_count = round(test_fraction * count), round(val_fraction * count)
    try:
        # plain object arrays: some pandas/scikit-learn pairs cannot index an Arrow-backed Index
        rest, test = train_test_split(lesions.index.to_numpy(dtype=object), test_size=test_count, stratify=lesions.values,
                                      random_state=seed)
        train, val = train_test_split(rest, test_size=val_count, stratify=lesions[rest].values,
                                      random_state=seed)
    except ValueError as error:
        raise PipelineError(f"cannot split {count} lesions with these fractions: {error}") from None
    manifests = {}
    by_image = frame.set_index("image_id")
    for name, members in zip(SPLITS, (train, val, test)):
        part = frame[frame[key].isin(set(members))].loc[:, ["image_id", "lesion_id", "dx"]]
        part = part.sort_values("image_id", kind="stable").reset_index(drop=True)
        part["label"] = part["dx"].map(CLASSES.index)
        patient = by_image.reindex(part["image_id"])
        for column in ("age", "sex", "localization"):
            part[column] = patient[column].to_numpy() if column in patient else ""
        absent = [dx for dx in CLASSES if dx not in set(part["dx"])]
        if absent:
            raise PipelineError(f"the {name} split has no lesion of class(es) {', '.join(absent)}; "
                                f"use more data or larger fractions")
        manifests[name] = part
    if group_by == "lesion":
        check_disjoint(manifests, total=len(frame))
    return manifests


def shared_lesions(manifests: dict[str, pd.DataFrame]) -> dict[str, int]:
    return {f"{a}-{b}": len(set(manifests[a]["lesion_id"]) & set(manifests[b]["lesion_id"]))
            for a, b in combinations(SPLITS, 2)}


def leaking_lesions(manifests: dict[str, pd.DataFrame]) -> int:
    """How many lesions have images in more than one split."""
    sides = pd.concat([m[["lesion_id"]].assign(side=name) for name, m in manifests.items()])
    return int((sides.groupby("lesion_id")["side"].nunique() > 1).sum())


def check_disjoint(manifests: dict[str, pd.DataFrame], total: int) -> None:
    """Fail loudly if any lesion is on two sides, or images were lost or doubled."""
    leaks = {pair: n for pair, n in shared_lesions(manifests).items() if n}
    if leaks:
        raise AssertionError(f"lesions shared between splits: {leaks}")
    images = sum(len(m) for m in manifests.values())
    if images != total or len(set().union(*(set(m["image_id"]) for m in manifests.values()))) != total:
        raise AssertionError(f"split holds {images} images, metadata {total}")


def summary(manifests: dict[str, pd.DataFrame]) -> dict:
    """Per-split image, lesion and class counts, and the lesions shared (0 unless the
    split was made by image)."""
    result = {}
    for name, part in manifests.items():
        counts = part["dx"].value_counts()
        result[name] = {"images": len(part), "lesions": int(part["lesion_id"].nunique()),
                        "classes": {dx: int(counts.get(dx, 0)) for dx in CLASSES}}
    result["shared_lesions"] = shared_lesions(manifests)
    return result


def read_manifest(path) -> pd.DataFrame:
    """A split's manifest (data/split/NAME.csv) with its ids as text, as every stage reads it."""
    return pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})

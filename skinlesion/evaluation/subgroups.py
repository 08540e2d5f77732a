"""Performance by patient group: the headline figures on the images of each sex, age
band, body site and diagnosis method (``dx_type``: histopathology, follow-up, expert
consensus, confocal microscopy), each with its 95 % lesion-bootstrap interval.

A group is reported only where it has enough images to say something
(``MIN_IMAGES``); its balanced accuracy is the mean recall over the classes present in
it, and its macro AUC the mean over the classes that it has both with and without."""

from __future__ import annotations

import numpy as np
import pandas as pd

from skinlesion import CLASSES
from skinlesion.evaluation import metrics

MIN_IMAGES = 30
MIN_MELANOMAS = 5
AGE_BANDS = ((0, 30, "under 30"), (30, 50, "30-49"), (50, 70, "50-69"), (70, 200, "70 and over"))
COLUMNS = ("sex", "age", "localization", "dx_type")
FIGURES = ("balanced_accuracy", "accuracy", "macro_roc_auc", "melanoma_sensitivity")


def with_dx_type(frame: pd.DataFrame, metadata_csv) -> pd.DataFrame:
    """``frame`` with each image's ``dx_type`` from ``metadata_csv`` (the raw metadata),
    when that has the column; rows keep their order."""
    table = pd.read_csv(metadata_csv, dtype=str, keep_default_na=False)
    if "dx_type" not in table.columns or "dx_type" in frame.columns:
        return frame
    kinds = table.drop_duplicates("image_id").set_index("image_id")["dx_type"]
    return frame.assign(dx_type=frame["image_id"].map(kinds).fillna("").to_numpy())


def age_band(values: pd.Series) -> pd.Series:
    ages = pd.to_numeric(values, errors="coerce")
    bands = pd.Series("unknown", index=values.index, dtype=object)
    for low, high, name in AGE_BANDS:
        bands[(ages >= low) & (ages < high)] = name
    return bands


def groups(frame: pd.DataFrame):
    """(column, value, boolean mask) for every group of ``frame``'s metadata columns."""
    for column in COLUMNS:
        if column not in frame.columns:
            continue
        values = age_band(frame[column]) if column == "age" else \
            frame[column].fillna("").astype(str).str.strip().replace("", "unknown")
        for value in sorted(values.unique()):
            yield column, value, (values == value).to_numpy()


def table(frame: pd.DataFrame, labels: np.ndarray, probabilities: np.ndarray, lesions: np.ndarray, *,
          resamples: int, seed: int, mel_threshold: float | None = None) -> pd.DataFrame:
    """One row per group: its size and, where it has ``MIN_IMAGES`` images, the figures
    with their intervals (blank where a figure is undefined for the group): balanced
    accuracy, accuracy, macro AUC and, with the validation ``mel_threshold``, melanoma
    sensitivity where the group has ``MIN_MELANOMAS`` melanomas. ``below_overall``
    flags a group whose balanced accuracy interval lies wholly below the figure of all
    the images together."""
    labels, lesions = np.asarray(labels), np.asarray(lesions)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    overall = metrics.headline(labels, probabilities)["balanced_accuracy"]
    mel = CLASSES.index("mel")
    rows = []
    for column, value, mask in groups(frame):
        row = {"group": column, "value": value, "images": int(mask.sum()),
               "lesions": int(len(set(lesions[mask].astype(str)))), "classes": int(len(set(labels[mask])))}
        if row["images"] >= MIN_IMAGES:
            figures = metrics.headline(labels[mask], probabilities[mask])
            figures["macro_roc_auc"] = figures.pop("macro_auc")
            melanomas = int((labels[mask] == mel).sum())
            threshold = mel_threshold if melanomas >= MIN_MELANOMAS else None
            intervals = metrics.bootstrap_intervals(labels[mask], probabilities[mask], lesions[mask],
                                                    resamples=resamples, seed=seed, mel_threshold=threshold)
            if threshold is not None:
                figures["melanoma_sensitivity"] = float((probabilities[mask][labels[mask] == mel, mel]
                                                         >= threshold).mean())
            row["melanomas"] = melanomas
            for name in FIGURES:
                value_ = figures.get(name)
                row[name] = None if value_ is None or not np.isfinite(value_) else round(float(value_), 4)
                row[f"{name}_low"] = intervals.get(name, {}).get("low")
                row[f"{name}_high"] = intervals.get(name, {}).get("high")
            high = row["balanced_accuracy_high"]
            row["below_overall"] = bool(high is not None and np.isfinite(high) and high < overall)
        rows.append(row)
    columns = ["group", "value", "images", "lesions", "classes", "melanomas",
               *[f"{name}{suffix}" for name in FIGURES for suffix in ("", "_low", "_high")], "below_overall"]
    return pd.DataFrame(rows).reindex(columns=columns)

"""The patient's metadata as model input: age, sex and body site, the official
HAM10000 columns, encoded as a fixed-length vector of floats.

The encoding is fixed (not fitted), recorded in the model file, and every value it
does not know, a blank age included, has its own encoding:

- age / 100, and a flag that is 1 when the age is blank (the age then reads 0);
- sex, one-hot over male, female and unknown (anything else);
- body site, one-hot over the HAM10000 sites and unknown (anything else).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SEXES = ("male", "female")
SITES = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity",
         "neck", "scalp", "trunk", "upper extremity")
COLUMNS = ("age", "sex", "localization")


def encoding() -> dict:
    """What the model file records: enough to encode a row the same way again."""
    return {"age_scale": 100.0, "sex": list(SEXES), "localization": list(SITES)}


def width(spec: dict) -> int:
    return 2 + len(spec["sex"]) + 1 + len(spec["localization"]) + 1


def encode(frame: pd.DataFrame, spec: dict) -> np.ndarray:
    """N x width float32 rows for ``frame``'s age, sex and localization (missing columns
    count as unknown for every row)."""
    n = len(frame)
    text = {c: frame[c].astype(str).str.strip().str.lower() if c in frame else pd.Series([""] * n)
            for c in COLUMNS}
    age = pd.to_numeric(text["age"], errors="coerce").to_numpy(dtype=float)
    blank = ~np.isfinite(age)
    out = [np.where(blank, 0.0, age / spec["age_scale"])[:, None], blank[:, None].astype(float)]
    for column in ("sex", "localization"):
        known = list(spec[column])
        index = text[column].map({value: i for i, value in enumerate(known)}).fillna(len(known))
        out.append(np.eye(len(known) + 1)[index.to_numpy(dtype=int)])
    return np.concatenate(out, axis=1).astype(np.float32)

"""Checks on the patient's metadata given at prediction time (the prediction
command's --metadata CSV, the page's form): a value that the encoding
(skinlesion.data.patient) would read as unknown without a word is refused with a
line that names it. Kept apart from the encoding, which the pipeline's stages
depend on, so that changing a check retrains nothing."""

from __future__ import annotations

import pandas as pd

from skinlesion.data.patient import COLUMNS

MAX_AGE = 120


def describe_problem(age, sex, site, spec: dict) -> str | None:
    """What is wrong with one patient's values, or None. Blank values and 'unknown'
    are fine (they have their own encoding); anything else the encoding would read as
    unknown without a word, a misspelt site say, is refused."""
    age, sex, site = (str(value if value is not None else "").strip() for value in (age, sex, site))
    if age and age.lower() not in ("unknown", "nan"):
        try:
            years = float(age)
        except ValueError:
            years = float("nan")
        if not 0 <= years <= MAX_AGE:
            return f"age '{age}' is not a number of years from 0 to {MAX_AGE}; leave it blank if unknown"
    for column, value in (("sex", sex), ("localization", site)):
        known = list(spec[column])
        if value and value.lower() not in known + ["unknown"]:
            return f"{column} '{value}' is not one of {', '.join(known)} or unknown"
    return None


def first_problem(frame: pd.DataFrame, spec: dict) -> tuple[int, str] | None:
    """(row position, what is wrong) for the first row of ``frame`` with a value the
    encoding does not know, or None."""
    columns = [frame[c].to_numpy() if c in frame else [""] * len(frame) for c in COLUMNS]
    for position, values in enumerate(zip(*columns)):
        problem = describe_problem(*values, spec)
        if problem:
            return position, problem
    return None

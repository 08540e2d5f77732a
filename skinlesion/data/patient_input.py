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


# Names that mean one of the expected columns; a table that uses them (or the expected
# names in another case) would otherwise be read as all unknown without a word.
LOOK_ALIKES = {
    "image_id": ("image", "imageid", "image_name", "isic_id"),
    "age": ("age_approx", "patient_age", "years", "age_years"),
    "sex": ("gender", "patient_sex"),
    "localization": ("location", "localisation", "site", "body_site", "bodysite", "anatom_site",
                     "anatom_site_general", "anatom_site_general_challenge", "body_part", "region"),
}


def _key(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def column_problem(columns) -> str | None:
    """What is wrong with a metadata table's header, or None: each of image_id, age, sex and
    localization must be there by that name, and no other column may look like one of them."""
    columns = [str(c) for c in columns]
    for expected, alikes in LOOK_ALIKES.items():
        similar = [c for c in columns if c != expected and (_key(c) == expected or _key(c) in alikes)]
        present = expected in columns
        if similar and not (present and expected == "image_id"):  # a second id column changes no answer
            return (f"column '{similar[0]}' looks like '{expected}'"
                    + ("; there is a column by that name too: remove one" if present
                       else f"; rename it to '{expected}' (the names are exact, in lower case)"))
    missing = [c for c in LOOK_ALIKES if c not in columns]
    if missing:
        return (f"no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}; give columns image_id, age, sex, "
                f"localization (blank or 'unknown' where not known)")
    return None


def duplicate_problem(frame: pd.DataFrame) -> str | None:
    """Two rows for one image_id, named by their lines, or None."""
    duplicated = frame["image_id"].astype(str).str.strip().duplicated(keep=False).to_numpy()
    if not duplicated.any():
        return None
    lines = [i + 2 for i in duplicated.nonzero()[0]]
    first = frame["image_id"].iloc[lines[0] - 2]
    same = [line for line in lines if frame["image_id"].iloc[line - 2] == first]
    return f"image_id {first} is on lines {', '.join(map(str, same[:5]))}; give one row per image"

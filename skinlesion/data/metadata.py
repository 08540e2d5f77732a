"""Read and validate HAM10000 metadata; every error names the file and the lines."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from skinlesion import CLASSES, METADATA_COLUMNS, PipelineError
from skinlesion.untrusted import first_line

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""image_id and lesion_id become file names, so they may not hold path separators."""

_SHOWN = 5  # how many offending rows an error message lists


def _lines(frame: pd.DataFrame, mask) -> str:
    positions = [i for i, bad in enumerate(mask) if bad]  # by position: the line is the row's place in the file
    ids = frame["image_id"].to_numpy()
    shown = ", ".join(f"line {i + 2} ({ids[i]})" for i in positions[:_SHOWN])
    more = len(positions) - _SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def validate(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Check ``frame`` (read with every column as text) and return it in canonical
    form: the official columns in order, sorted by image_id, dx in lower case.

    ``name`` is the file the rows came from, for the messages; line numbers count
    the header as line 1.
    """
    frame = frame.rename(columns=lambda column: str(column).strip())
    missing = [column for column in METADATA_COLUMNS if column not in frame.columns]
    if missing:
        raise PipelineError(
            f"{name}: missing column(s) {', '.join(missing)}; a HAM10000 metadata CSV has "
            f"{', '.join(METADATA_COLUMNS)}"
        )
    if frame.empty:
        raise PipelineError(f"{name}: no rows")
    frame = frame.loc[:, list(METADATA_COLUMNS)].fillna("").astype(str)
    frame = frame.apply(lambda column: column.str.strip())
    frame["dx"] = frame["dx"].str.lower()

    for column in ("image_id", "lesion_id"):
        bad = ~frame[column].str.match(SAFE_ID)
        if bad.any():
            raise PipelineError(
                f"{name}: empty or unsafe {column} on {_lines(frame, bad)}; ids may hold only "
                f"letters, digits, '_', '-' and '.'"
            )
    unknown = ~frame["dx"].isin(CLASSES)
    if unknown.any():
        values = sorted(set(frame.loc[unknown, "dx"]))
        raise PipelineError(
            f"{name}: unknown dx {values} on {_lines(frame, unknown)}; expected one of "
            f"{', '.join(CLASSES)}"
        )
    duplicated = frame["image_id"].duplicated(keep=False)
    if duplicated.any():
        raise PipelineError(f"{name}: duplicate image_id on {_lines(frame, duplicated)}; each image must be listed once")
    per_lesion = frame.groupby("lesion_id")["dx"].nunique()
    conflicting = frame["lesion_id"].isin(per_lesion[per_lesion > 1].index)
    if conflicting.any():
        raise PipelineError(
            f"{name}: one lesion_id with several dx on {_lines(frame, conflicting)}; every image "
            f"of a lesion must carry the same diagnosis"
        )
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True)


def read(path: str | Path, name: str | None = None) -> pd.DataFrame:
    """Read a metadata CSV (or Dataverse's tab-separated .tab) and validate it."""
    path = Path(path)
    name = name or str(path)
    separator = "\t" if path.suffix.lower() in {".tab", ".tsv"} else ","
    header = _header(path, name)
    if separator == "," and ";" in header and "," not in header:
        raise PipelineError(
            f"{name}: looks ';'-separated (as spreadsheet programs save CSV where the decimal mark is a "
            f"comma); save it as comma-separated CSV (e.g. Excel's 'CSV UTF-8 (Comma delimited)')"
        )
    try:
        # index_col=False: a row with more fields than the header must not turn the first column into an index
        frame = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(f"{name}: not a readable CSV ({first_line(error)})") from None
    return validate(frame, name)


def _header(path: Path, name: str | None = None) -> str:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            return handle.readline()
    except PermissionError:
        raise PipelineError(f"{name or path}: cannot be read (permission denied); give this user read access "
                            f"to it") from None


def header_looks_like_metadata(path: Path, name: str | None = None) -> bool:
    """Whether a CSV/TSV's first line names the columns that identify HAM10000 metadata
    (';'-separated too, so that read() can say what is wrong with such a file)."""
    names = {part.strip().strip('"') for part in re.split(r"[,;\t]", _header(path, name))}
    return {"lesion_id", "image_id", "dx"} <= names


def write(path: str | Path, frame: pd.DataFrame) -> None:
    from skinlesion.files import write_csv

    write_csv(path, frame.loc[:, list(METADATA_COLUMNS)])

"""Property: on any CSV, the metadata reader either accepts it (and what it returns
is valid) or raises the project's own PipelineError, never anything else."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skinlesion import CLASSES, METADATA_COLUMNS, PipelineError
from skinlesion.data import metadata

cells = st.one_of(st.sampled_from(list(CLASSES) + ["MEL", " nv ", "", "melanoma", "HAM_1", "ISIC_1", "../x",
                                                   "80.0", "nan", '"', ",", "\n"]),
                  st.text(max_size=8))
headers = st.lists(st.sampled_from(list(METADATA_COLUMNS) + ["extra", "", "dx "]), min_size=0, max_size=9)


@st.composite
def tables(draw):
    header = draw(headers)
    rows = draw(st.lists(st.lists(cells, min_size=len(header), max_size=len(header) + 1), max_size=12))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(tables(), st.text(max_size=200)), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_reader_accepts_valid_input_or_raises_its_own_error(text, raw, use_raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "HAM10000_metadata.csv"
        path.write_bytes(raw if use_raw else text.encode("utf-8"))
        try:
            frame = metadata.read(path)
        except PipelineError as error:
            assert str(error).startswith(str(path))
            return
    assert list(frame.columns) == list(METADATA_COLUMNS) and len(frame) > 0
    assert frame["dx"].isin(CLASSES).all() and frame["image_id"].is_unique
    assert frame.groupby("lesion_id")["dx"].nunique().max() == 1
    assert list(frame["image_id"]) == sorted(frame["image_id"])


@st.composite
def valid_tables(draw):
    """A well-formed metadata CSV: the official columns in any order, unique image ids,
    one diagnosis per lesion, any mix of blank and given ages, sexes and sites."""
    header = draw(st.permutations(list(METADATA_COLUMNS)))
    count = draw(st.integers(min_value=1, max_value=12))
    lesions = draw(st.lists(st.integers(0, 5), min_size=count, max_size=count))
    diagnosis = {lesion: draw(st.sampled_from(CLASSES)) for lesion in set(lesions)}
    rows = []
    for index, lesion in enumerate(lesions):
        values = {"lesion_id": f"HAM_{lesion:07d}", "image_id": f"ISIC_{index:07d}", "dx": diagnosis[lesion],
                  "dx_type": draw(st.sampled_from(["histo", "follow_up", "consensus", "confocal"])),
                  "age": draw(st.sampled_from(["", "5.0", "45.0", "85.0"])),
                  "sex": draw(st.sampled_from(["male", "female", "unknown", ""])),
                  "localization": draw(st.sampled_from(["back", "face", "lower extremity", "unknown", ""]))}
        rows.append([values[column] for column in header])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(draw(st.permutations(rows)))
    return buffer.getvalue(), count


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=valid_tables())
def test_reader_accepts_every_well_formed_table(table):
    """The other half of the property above, which rarely draws a valid table: a
    well-formed one is always accepted, whole and in image order."""
    text, count = table
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "HAM10000_metadata.csv"
        path.write_text(text, encoding="utf-8")
        frame = metadata.read(path)
    assert list(frame.columns) == list(METADATA_COLUMNS) and len(frame) == count
    assert list(frame["image_id"]) == sorted(frame["image_id"])

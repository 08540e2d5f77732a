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

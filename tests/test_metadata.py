"""Metadata validation: each problem is named by file, line and image_id."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from skinlesion import PipelineError
from skinlesion.data import metadata

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"


def write(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "HAM10000_metadata.csv"
    path.write_text(header + body)
    return path


def test_valid_metadata_is_sorted_and_normalised(tmp_path):
    frame = metadata.read(write(tmp_path, "HAM_2,ISIC_2,NV ,histo,45.0,male,back\n"
                                          "HAM_1,ISIC_1,mel,histo,,female,face\n"))
    assert list(frame.image_id) == ["ISIC_1", "ISIC_2"]
    assert list(frame.dx) == ["mel", "nv"]
    assert frame.loc[0, "age"] == ""


def test_unknown_dx_names_line_and_image(tmp_path):
    path = write(tmp_path, "HAM_1,ISIC_1,mel,histo,,,\nHAM_2,ISIC_2,melanoma,histo,,,\n")
    with pytest.raises(PipelineError, match=r"unknown dx \['melanoma'\] on line 3 \(ISIC_2\); expected one of akiec"):
        metadata.read(path)


def test_duplicate_image_id_names_both_lines(tmp_path):
    path = write(tmp_path, "HAM_1,ISIC_1,mel,histo,,,\nHAM_2,ISIC_2,nv,histo,,,\nHAM_3,ISIC_1,mel,histo,,,\n")
    with pytest.raises(PipelineError, match=r"duplicate image_id on line 2 \(ISIC_1\), line 4 \(ISIC_1\)"):
        metadata.read(path)


def test_missing_columns_are_listed(tmp_path):
    path = write(tmp_path, "HAM_1,ISIC_1,mel\n", header="lesion_id,image_id,dx\n")
    with pytest.raises(PipelineError, match="missing column\\(s\\) dx_type, age, sex, localization"):
        metadata.read(path)


def test_lesion_with_two_diagnoses(tmp_path):
    path = write(tmp_path, "HAM_1,ISIC_1,mel,histo,,,\nHAM_1,ISIC_2,nv,histo,,,\n")
    with pytest.raises(PipelineError, match="one lesion_id with several dx"):
        metadata.read(path)


@pytest.mark.parametrize("image_id", ["../ISIC_1", "", "a/b"])
def test_ids_that_could_escape_a_folder_are_refused(tmp_path, image_id):
    with pytest.raises(PipelineError, match="empty or unsafe image_id on line 2"):
        metadata.read(write(tmp_path, f"HAM_1,{image_id},mel,histo,,,\n"))


def test_empty_and_unparseable_files(tmp_path):
    with pytest.raises(PipelineError, match="no rows"):
        metadata.read(write(tmp_path, ""))
    (tmp_path / "bad.csv").write_bytes(b"")
    with pytest.raises(PipelineError, match="bad.csv: not a readable CSV"):
        metadata.read(tmp_path / "bad.csv")


def test_dataverse_tab_file_is_read_as_tab_separated(tmp_path):
    path = tmp_path / "HAM10000_metadata.tab"
    pd.DataFrame([["HAM_1", "ISIC_1", "bcc", "histo", "60.0", "male", "back"]],
                 columns=HEADER.strip().split(",")).to_csv(path, sep="\t", index=False)
    assert list(metadata.read(path).dx) == ["bcc"]

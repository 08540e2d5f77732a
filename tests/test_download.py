"""The download path over real HTTP on 127.0.0.1: Dataverse and ISIC 2018 sources,
progress, resume after a cut connection, checksum mismatch."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from skinlesion import CLASSES, PipelineError
from skinlesion.data import download
from skinlesion.data.http import fetch
from tests.conftest import group, make_project, run_stage, set_params

DOI = "doi:10.7910/DVN/DBW86T"
LISTING = "/api/datasets/:persistentId/versions/:latest-published/files?persistentId=doi%3A10.7910%2FDVN%2FDBW86T"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def serve_dataverse(server, source: Path, *, wrong_md5_for: str | None = None) -> dict[str, bytes]:
    """Publish the synthetic copy as Dataverse does: a JSON listing with an MD5 per
    file, the metadata as an ingested tabular file (original via ?format=original),
    and a file the pipeline must not fetch."""
    files = {
        "HAM10000_images_part_1.zip": (source / "HAM10000_images.zip").read_bytes(),
        "HAM10000_segmentations_lesion_tschandl.zip": (source / "HAM10000_segmentations.zip").read_bytes(),
        "HAM10000_metadata.csv": (source / "HAM10000_metadata.csv").read_bytes(),
        "ISIC2018_Task3_Test_Images.zip": b"not needed",
    }
    entries = []
    for number, (name, body) in enumerate(files.items(), start=100):
        tabular = name.endswith(".csv")
        data_file = {"id": number, "filename": name.replace(".csv", ".tab") if tabular else name,
                     "filesize": len(body) + (7 if tabular else 0),
                     "checksum": {"type": "MD5", "value": md5(b"x") if name == wrong_md5_for else md5(body)}}
        if tabular:
            data_file |= {"originalFileName": name, "originalFileSize": len(body)}
        entries.append({"label": data_file["filename"], "dataFile": data_file})
        server.files[f"/api/access/datafile/{number}" + ("?format=original" if tabular else "")] = body
    server.files[LISTING] = json.dumps({"status": "OK", "data": entries}).encode()
    return files


def dataverse_params(server, tmp_path, **extra):
    return group("download", source="dataverse", dataverse_server=server.url, dataverse_doi=DOI, retries=3,
                 max_unpacked_gb=1, path="", **extra)


def test_dataverse_download_verifies_and_shows_progress(http_server, synthetic_zips, tmp_path, capfd,
                                                        monkeypatch):
    monkeypatch.setenv("SKINLESION_PROGRESS", "1")
    serve_dataverse(http_server, synthetic_zips)
    record = download.download(dataverse_params(http_server, tmp_path), tmp_path / "raw", tmp_path / "cache")

    expected = pd.read_csv(synthetic_zips / "HAM10000_metadata.csv")
    assert record["images"] == len(expected) and record["masks"] == len(expected)
    assert sorted(p.name for p in (tmp_path / "raw/images").iterdir()) == sorted(expected.image_id + ".jpg")
    assert not any("ISIC2018_Task3_Test_Images" in path for path, _ in http_server.requests)
    names = [entry["name"] for entry in record["source"]["files"]]
    assert names == ["HAM10000_images_part_1.zip", "HAM10000_metadata.csv",
                     "HAM10000_segmentations_lesion_tschandl.zip"]
    err = capfd.readouterr().err
    assert "HAM10000_images_part_1.zip" in err and "100%" in err  # the progress bar ran to the end

    # A second run finds the verified files in the cache and downloads nothing.
    before = len(http_server.requests)
    download.download(dataverse_params(http_server, tmp_path), tmp_path / "raw2", tmp_path / "cache")
    assert len(http_server.requests) == before + 1  # the listing only


def test_resumes_after_a_cut_connection(http_server, synthetic_zips, tmp_path, caplog):
    files = serve_dataverse(http_server, synthetic_zips)
    cut = 1 << 16  # the first response dies after one read's worth
    assert len(files["HAM10000_images_part_1.zip"]) > 2 * cut
    http_server.cuts["/api/access/datafile/100"] = [cut]

    with caplog.at_level(logging.INFO):
        download.download(dataverse_params(http_server, tmp_path), tmp_path / "raw", tmp_path / "cache")

    ranges = [rng for path, rng in http_server.requests if path == "/api/access/datafile/100"]
    assert ranges == [None, f"bytes={cut}-"]  # the retry asked only for the rest
    assert (tmp_path / "cache/dataverse/HAM10000_images_part_1.zip").read_bytes() == files["HAM10000_images_part_1.zip"]
    assert "resuming" in caplog.text


def test_resumes_a_partial_download_across_runs(http_server, tmp_path):
    body = bytes(range(256)) * 4000
    http_server.files["/big.bin"] = body
    http_server.cuts["/big.bin"] = [2 << 16]
    with pytest.raises(PipelineError, match="run again to resume from 131072 bytes"):
        fetch(f"{http_server.url}/big.bin", tmp_path / "big.bin", checksum=("md5", md5(body)), retries=0)
    assert (tmp_path / "big.bin.part").stat().st_size == 131072 and not (tmp_path / "big.bin").exists()

    fetch(f"{http_server.url}/big.bin", tmp_path / "big.bin", checksum=("md5", md5(body)), retries=0)
    assert (tmp_path / "big.bin").read_bytes() == body
    assert http_server.requests[-1] == ("/big.bin", "bytes=131072-")


def test_server_that_ignores_range_restarts_cleanly(http_server, tmp_path):
    body = b"abcdefgh" * 50_000
    http_server.files["/f"] = body
    http_server.honour_range = False
    (tmp_path / "f.part").write_bytes(body[:1000])
    fetch(f"{http_server.url}/f", tmp_path / "f", checksum=("md5", md5(body)), size=len(body))
    assert (tmp_path / "f").read_bytes() == body


def test_checksum_mismatch_fails_and_leaves_nothing(http_server, synthetic_zips, tmp_path):
    serve_dataverse(http_server, synthetic_zips, wrong_md5_for="HAM10000_images_part_1.zip")
    with pytest.raises(PipelineError, match=r"HAM10000_images_part_1.zip: md5 checksum mismatch"):
        download.download(dataverse_params(http_server, tmp_path), tmp_path / "raw", tmp_path / "cache")
    assert not (tmp_path / "raw").exists()
    cache = tmp_path / "cache/dataverse"
    assert not (cache / "HAM10000_images_part_1.zip").exists()
    assert not (cache / "HAM10000_images_part_1.zip.part").exists()


def test_download_stage_exits_nonzero_with_one_line_error(http_server, synthetic_zips, tmp_path):
    serve_dataverse(http_server, synthetic_zips, wrong_md5_for="HAM10000_metadata.csv")
    project = make_project(tmp_path / "project", synthetic_zips)
    set_params(project, {"download.source": "dataverse", "download.dataverse_server": http_server.url})
    result = run_stage(project, "download")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: download: HAM10000_metadata.csv: md5 checksum mismatch")
    assert not (project / "data/raw").exists()


def serve_isic(server, source: Path, part: str = "Training") -> dict[str, bytes]:
    """Publish the synthetic copy as the ISIC 2018 Task 3 ``part`` (Training or Test):
    images, one-hot ground truth, and (Training only) the lesion groupings."""
    frame = pd.read_csv(source / "HAM10000_metadata.csv")
    truth = pd.DataFrame({"image": frame.image_id})
    for name in CLASSES:
        truth[name.upper()] = (frame.dx == name).astype(float)
    truth_zip = io.BytesIO()
    with zipfile.ZipFile(truth_zip, "w") as archive:
        archive.writestr(f"ISIC2018_Task3_{part}_GroundTruth/ISIC2018_Task3_{part}_GroundTruth.csv",
                         truth.to_csv(index=False))
    images = io.BytesIO()
    with zipfile.ZipFile(source / "HAM10000_images.zip") as src, zipfile.ZipFile(images, "w") as archive:
        for name in src.namelist():
            archive.writestr(f"ISIC2018_Task3_{part}_Input/{name}", src.read(name))
        archive.writestr(f"ISIC2018_Task3_{part}_Input/LICENSE.txt", "CC BY-NC")
    files = {f"ISIC2018_Task3_{part}_Input.zip": images.getvalue(),
             f"ISIC2018_Task3_{part}_GroundTruth.zip": truth_zip.getvalue()}
    if part == "Training":
        groupings = frame.rename(columns={"image_id": "image", "dx_type": "diagnosis_confirm_type"})
        files["ISIC2018_Task3_Training_LesionGroupings.csv"] = \
            groupings[["image", "lesion_id", "diagnosis_confirm_type"]].to_csv(index=False).encode()
    for name, body in files.items():
        server.files[f"/2018/{name}"] = body
    return files


def test_isic2018_source_records_hashes_and_catches_a_change(http_server, synthetic_zips, tmp_path):
    files = serve_isic(http_server, synthetic_zips)
    params = group("download", source="isic2018", isic2018_url=f"{http_server.url}/2018", retries=1,
                   max_unpacked_gb=1, path="")
    record = download.download(params, tmp_path / "raw", tmp_path / "cache")

    official = pd.read_csv(synthetic_zips / "HAM10000_metadata.csv").sort_values("image_id")
    raw = pd.read_csv(tmp_path / "raw/metadata.csv")
    assert list(raw.image_id) == list(official.image_id) and list(raw.dx) == list(official.dx)
    assert list(raw.lesion_id) == list(official.lesion_id)
    assert record["left_out"]["files_not_images"] == [
        "ISIC2018_Task3_Training_Input.zip:ISIC2018_Task3_Training_Input/LICENSE.txt"]
    recorded = (tmp_path / "cache/isic2018/SHA256SUMS").read_text()
    assert hashlib.sha256(files["ISIC2018_Task3_Training_Input.zip"]).hexdigest() in recorded

    # The server's copy changes; a fresh download no longer matches what was recorded.
    (tmp_path / "cache/isic2018/ISIC2018_Task3_Training_LesionGroupings.csv").unlink()
    http_server.files["/2018/ISIC2018_Task3_Training_LesionGroupings.csv"] += b"\n"
    with pytest.raises(PipelineError, match="differs from the copy first downloaded"):
        download.download(params, tmp_path / "raw2", tmp_path / "cache")
    assert not (tmp_path / "raw2").exists()


def test_isic2018_test_ground_truth_without_groupings_counts_each_image_as_a_lesion(http_server, synthetic_zips,
                                                                                     tmp_path):
    from skinlesion.data.isic2018 import ISIC2018_TEST_FILES, download_isic2018, isic2018_metadata

    serve_isic(http_server, synthetic_zips, part="Test")
    import requests

    paths, record = download_isic2018(f"{http_server.url}/2018", tmp_path / "cache", retries=1,
                                      session=requests.Session(), files=ISIC2018_TEST_FILES)
    assert [p.name for p in paths] == list(ISIC2018_TEST_FILES)
    frame = isic2018_metadata(paths[1], None)
    official = pd.read_csv(synthetic_zips / "HAM10000_metadata.csv").sort_values("image_id")
    assert list(frame.image_id) == list(official.image_id) and list(frame.dx) == list(official.dx)
    assert list(frame.lesion_id) == list(frame.image_id)


def test_isic2018_ground_truth_problems_are_one_line_errors(tmp_path):
    from skinlesion.data.isic2018 import isic2018_metadata

    truth = tmp_path / "truth.zip"
    rows = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_0000001,1,0,0,0,0,0,0\nISIC_0000002,yes,0,0,0,0,0,0\n"
    with zipfile.ZipFile(truth, "w") as archive:
        archive.writestr("truth.csv", rows)
    with pytest.raises(PipelineError, match=r"truth.zip: rows on line\(s\) 3 do not name exactly one diagnosis"):
        isic2018_metadata(truth, None)
    with zipfile.ZipFile(truth, "w") as archive:
        archive.writestr("truth.csv", rows.replace("yes", "0").replace("ISIC_0000002,0", "ISIC_0000002,1"))
    groupings = tmp_path / "groupings.csv"
    groupings.write_text("image,lesion_id\nISIC_0000001,HAM_1\n")
    with pytest.raises(PipelineError, match="groupings.csv: no lesion_id for 1 image\\(s\\): ISIC_0000002"):
        isic2018_metadata(truth, groupings)
    truth.write_bytes(b"<html>not found</html>")  # e.g. an error page saved under the zip's name
    with pytest.raises(PipelineError, match="truth.zip: not a readable ground-truth zip .*delete it and run again"):
        isic2018_metadata(truth, None)

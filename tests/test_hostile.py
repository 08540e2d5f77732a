"""Hostile input: a server, an archive, an upload, a model file or a params file made to
write outside the project, overwrite an input, exhaust memory or crash. Each case is a
real subprocess or a real HTTP request on 127.0.0.1: its exit code, its one line, no
traceback, nothing written where it must not be, and memory bounded (the child's peak
RSS, from wait4)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinlesion import CLASSES, PipelineError, modelfile
from skinlesion.data import download, patient
from skinlesion.data.http import fetch
from skinlesion.training import models
from skinlesion.untrusted import MAX_FILE_BYTES, MAX_PIXELS
from tests.conftest import group, make_project, run_stage, set_params
from tests.conftest import run_command as run
from tests.test_bad_input import assert_one_line
from tests.test_download import LISTING, dataverse_params, md5, serve_dataverse, serve_isic

PREDICT = [sys.executable, "-m", "skinlesion.predict"]
SCORE = [sys.executable, "-m", "skinlesion.score"]
MiB = 2**20
# Peak RSS of an ordinary prediction on the 2-core reference machine: about 970 MiB, of which
# importing torch is 635. A bomb that got through would add its own size (a 13000 x 13000
# image alone is 480 MiB of pixels; the 3 GiB member, 3 GiB).
BOUND = 1300


# A small Python between the test and the command: Linux counts into a child's peak RSS the
# memory of the process it was forked from (the whole test session, by the end of a run), so the
# command is forked from this wrapper instead, which reports the command's own peak.
MEASURE = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_run(command: list, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``command`` run as ``run_command`` runs it, and its peak resident memory in MiB."""
    peak = cwd / ".peak"
    result = run([sys.executable, "-c", MEASURE, peak, *command], cwd)
    kib = int(peak.read_text())
    peak.unlink()
    return result, kib / 1024


def huge_png(path: Path, side: int = 13000) -> Path:
    """A PNG that claims ``side`` x ``side`` RGB pixels in a few hundred bytes: its size is
    read from the header, so the cap must act before any pixel is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    return path


# --- a download server -----------------------------------------------------------

@pytest.mark.parametrize("name", ["HAM10000_images/../../../../../escaped.zip", "HAM10000_images\\..\\..\\escaped.zip",
                                  "HAM10000_images_\x1b[2J.zip"])
def test_a_listing_whose_file_name_leaves_the_cache_is_refused(http_server, synthetic_zips, tmp_path, name):
    files = serve_dataverse(http_server, synthetic_zips)
    listing = json.loads(http_server.files[LISTING])
    entry = next(e for e in listing["data"] if e["dataFile"]["filename"] == "HAM10000_images_part_1.zip")
    entry["dataFile"]["filename"] = entry["label"] = name  # with the file's true MD5
    assert entry["dataFile"]["checksum"]["value"] == md5(files["HAM10000_images_part_1.zip"])
    http_server.files[LISTING] = json.dumps(listing).encode()
    project = make_project(tmp_path / "deep/er/project", synthetic_zips)
    set_params(project, {"download.source": "dataverse", "download.dataverse_server": http_server.url})
    result = run_stage(project, "download")
    assert_one_line(result, 1, "refusing the file name")
    assert "\x1b" not in result.stderr  # a terminal escape is shown escaped, not sent
    assert not list(tmp_path.rglob("escaped.zip")) and not list(tmp_path.rglob("*escaped*"))
    assert not (project / "data/raw").exists()


@pytest.mark.parametrize("field, value, said", [("id", "../../../escaped", "file id"), ("filesize", -3, "size"),
                                                ("checksum", {"type": "ROT13", "value": "ab"}, "checksum")])
def test_a_listing_with_a_field_that_is_not_what_it_must_be_is_refused(http_server, synthetic_zips, tmp_path,
                                                                       field, value, said):
    serve_dataverse(http_server, synthetic_zips)
    listing = json.loads(http_server.files[LISTING])
    listing["data"][0]["dataFile"][field] = value
    http_server.files[LISTING] = json.dumps(listing).encode()
    with pytest.raises(PipelineError, match=said):
        download.download(dataverse_params(http_server, tmp_path), tmp_path / "raw", tmp_path / "cache")
    assert not (tmp_path / "raw").exists()


def test_a_body_longer_than_its_listed_size_is_cut_off_while_reading(http_server, tmp_path):
    http_server.files["/big"] = b"x" * (4 * MiB)
    with pytest.raises(PipelineError, match="announces 4194304 bytes, more than the 1000 listed"):
        fetch(f"{http_server.url}/big", tmp_path / "big", size=1000, retries=0)
    http_server.unannounced.add("/big")  # no Content-Length: only reading can tell
    with pytest.raises(PipelineError, match="sent more than the 1000 bytes listed"):
        fetch(f"{http_server.url}/big", tmp_path / "big", size=1000, retries=0)
    assert not list(tmp_path.iterdir())  # neither the file nor its .part


def test_a_redirect_to_a_local_file_or_a_listing_nested_past_reason_is_one_line(http_server, synthetic_zips,
                                                                                 tmp_path):
    http_server.redirects["/away"] = "file:///etc/passwd"
    with pytest.raises(PipelineError, match="sent an unusable answer"):
        fetch(f"{http_server.url}/away", tmp_path / "passwd", retries=0)
    assert not list(tmp_path.iterdir())
    serve_dataverse(http_server, synthetic_zips)
    http_server.files[LISTING] = b"[" * 200_000 + b"]" * 200_000  # deeper than any parser's recursion
    with pytest.raises(PipelineError, match="cannot list the files of"):
        download.download(dataverse_params(http_server, tmp_path), tmp_path / "raw", tmp_path / "cache")


def test_a_zip_that_holds_itself_or_nests_too_deep_is_refused(kit, tmp_path):
    inner = kit.image.read_bytes()
    name = "ISIC_0024306.jpg"
    for depth in range(10):
        buffer = tmp_path / f"level{depth}.zip"
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(name, inner)
        inner, name = buffer.read_bytes(), f"level{depth}.zip"
    result = run([*PREDICT, kit.model, tmp_path / "level9.zip", "-o", tmp_path / "out.csv"], tmp_path)
    assert_one_line(result, 2, "zips nested more than 8 deep; refusing this archive")
    assert not (tmp_path / "out.csv").exists()


def test_control_characters_in_a_file_name_are_shown_escaped(kit, tmp_path):
    with zipfile.ZipFile(tmp_path / "scans.zip", "w") as archive:
        archive.writestr("ok.jpg", kit.image.read_bytes())
        archive.writestr("\x1b[2Jforged\nerror: all fine.jpg", b"not an image")
    result = run([*PREDICT, kit.model, tmp_path / "scans.zip", "-o", tmp_path / "out.csv"], tmp_path)
    assert result.returncode == 1 and "\x1b" not in result.stderr and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: scans.zip:\\x1b[2Jforged\\nerror: all fine.jpg is not an image (no format Pillow recognises)"]


@pytest.mark.parametrize("name", ["=HYPERLINK(\"x.invalid\",\"open\")", "+1+cmd", "-2+3", "@SUM(A1)"])
def test_a_file_name_a_spreadsheet_would_run_is_written_as_text(kit, tmp_path, name):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(kit.image, folder / f"{name}.jpg")
    shutil.copy(kit.image, folder / "plain.jpg")
    result = run([*PREDICT, kit.model, folder, "-o", tmp_path / "out.csv"], tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False).set_index("image_id")
    assert set(table.index) == {f"'{name}", "plain"}  # an apostrophe first: shown as text, never run
    text = table.reset_index().drop(columns=[c for c in table.columns if c.startswith("p_")] + ["confidence"])
    assert not [cell for cell in text.to_numpy().ravel() if cell.startswith(("=", "+", "-", "@"))]
    assert float(table.loc[f"'{name}", "p_nv"]) >= 0  # the numbers stay numbers


def test_a_bad_first_isic_download_is_not_recorded_and_the_real_file_then_passes(http_server, synthetic_zips,
                                                                                 tmp_path):
    files = serve_isic(http_server, synthetic_zips)
    truth = "/2018/ISIC2018_Task3_Training_GroundTruth.zip"
    http_server.files[truth] = b"<html><body>503 Service Unavailable</body></html>"
    params = group("download", source="isic2018", isic2018_url=f"{http_server.url}/2018", retries=1,
                   max_unpacked_gb=1, path="")
    with pytest.raises(PipelineError, match="no checksum recorded; run again"):
        download.download(params, tmp_path / "raw", tmp_path / "cache")
    recorded = tmp_path / "cache/isic2018/SHA256SUMS"
    assert not recorded.exists() or "GroundTruth" not in recorded.read_text()
    assert not (tmp_path / "cache/isic2018/ISIC2018_Task3_Training_GroundTruth.zip").exists()
    http_server.files[truth] = files["ISIC2018_Task3_Training_GroundTruth.zip"]  # the server recovers
    download.download(params, tmp_path / "raw", tmp_path / "cache")
    assert "GroundTruth" in recorded.read_text() and (tmp_path / "raw/metadata.csv").is_file()


# --- outputs never written over inputs ---------------------------------------------

def metadata_model(path: Path) -> Path:
    """A random simple_cnn at 32 px that takes the patient's metadata."""
    torch.manual_seed(0)
    head = {"hidden": 8, "dropout": 0}
    spec = patient.encoding()
    model = models.build("simple_cnn", num_classes=7, image_size=32, settings={}, head=head,
                         patient_width=patient.width(spec))
    modelfile.save(path, model, architecture="simple_cnn", settings={}, head=head, classes=CLASSES, image_size=32,
                   mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, training={}, patient=spec)
    return path


def zipped(folder: Path, tmp_path: Path) -> Path:
    with zipfile.ZipFile(tmp_path / "scans.zip", "w") as archive:
        for image in sorted(folder.glob("*.jpg")):
            archive.write(image, image.name)
    return tmp_path / "scans.zip"


# name: (the command, given kit, tmp_path and a copy of the images; the file -o names, which must survive)
OVERWRITES = {
    "an input image": lambda k, t, d: ([*PREDICT, k.model, d, "-o", d / "ISIC_0024306.jpg"], d / "ISIC_0024306.jpg"),
    "a named input image": lambda k, t, d: ([*PREDICT, k.model, d / "ISIC_0024306.jpg", "-o", d / "ISIC_0024306.jpg"],
                                            d / "ISIC_0024306.jpg"),
    "the model file": lambda k, t, d: ([*PREDICT, shutil.copy(k.model, t), d, "-o", t / "model.pt"], t / "model.pt"),
    "a hard link to the model": lambda k, t, d: (
        [*PREDICT, shutil.copy(k.model, t), d, "-o", os.link(t / "model.pt", t / "link.pt") or t / "link.pt"],
        t / "model.pt"),
    "a symbolic link to an input": lambda k, t, d: (
        [*PREDICT, k.model, d, "-o", (t / "out.csv").symlink_to(d / "ISIC_0024306.jpg") or t / "out.csv"],
        d / "ISIC_0024306.jpg"),
    "the input zip": lambda k, t, d: ([*PREDICT, k.model, zipped(d, t), "-o", t / "scans.zip"], t / "scans.zip"),
    "the --metadata CSV": lambda k, t, d: (
        [*PREDICT, metadata_model(t / "meta.pt"), d, "--metadata", t / "patients.csv", "-o", t / "patients.csv"],
        t / "patients.csv"),
    "--score: the source's metadata CSV": lambda k, t, d: (
        [*SCORE, k.model, shutil.copytree(k.ham, t / "ham"), "-o", t / "ham/HAM10000_metadata.csv"],
        t / "ham/HAM10000_metadata.csv"),
    "--score: the --labels CSV": lambda k, t, d: (
        [*SCORE, k.model, k.ham, "--labels", shutil.copy(k.ham / "HAM10000_metadata.csv", t / "l.csv"),
         "-o", t / "l.csv"], t / "l.csv"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OVERWRITES))
def test_the_prediction_command_never_writes_over_one_of_its_inputs(kit, tmp_path, case):
    images = tmp_path / "scans"
    shutil.copytree(kit.image.parent, images)
    frame = pd.DataFrame({"image_id": [p.stem for p in sorted(images.glob("*.jpg"))], "age": "50", "sex": "male",
                          "localization": "back"})
    frame.to_csv(tmp_path / "patients.csv", index=False)
    command, kept = OVERWRITES[case](kit, tmp_path, images)
    before = Path(kept).read_bytes()
    result = run(command, tmp_path)
    assert_one_line(result, 2, "one of this run's inputs; writing there would destroy it")
    assert Path(kept).read_bytes() == before


@pytest.mark.slow
def test_an_earlier_output_in_the_input_folder_is_still_replaced(kit, tmp_path):
    images = tmp_path / "scans"
    shutil.copytree(kit.image.parent, images)
    for _ in range(2):
        result = run([*PREDICT, kit.model, images, "-o", images / "predictions.txt"], tmp_path)
        assert result.returncode == 0, result.stderr
    assert "skipped 1 earlier output(s)" in result.stderr
    assert len(pd.read_csv(images / "predictions.txt")) == len(list(images.glob("*.jpg")))


# --- memory -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_zip_member_past_the_cap_is_refused_without_reading_it(kit, tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("big.jpg", "w", force_zip64=True) as member:
            for _ in range(MAX_FILE_BYTES // MiB + 2):
                member.write(bytes(MiB))
        archive.write(kit.image, "ISIC_0024306.jpg")
    assert (tmp_path / "bomb.zip").stat().st_size < 2 * MiB
    result, peak = peak_run([*PREDICT, kit.model, tmp_path / "bomb.zip", "-o", tmp_path / "out.csv"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "bomb.zip:big.jpg is larger than 128 MiB, the cap for one image" in result.stderr
    assert len(pd.read_csv(tmp_path / "out.csv")) == 1  # the other image is classified
    assert peak < BOUND, f"peak RSS {peak:.0f} MiB"


@pytest.mark.slow
def test_an_image_past_the_pixel_cap_is_refused_before_it_is_decoded(kit, tmp_path):
    png = huge_png(tmp_path / "huge.png")
    assert png.stat().st_size < 1000 and MAX_PIXELS < 13000 * 13000
    result, peak = peak_run([*PREDICT, kit.model, png, "-o", tmp_path / "out.csv"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "huge.png is 13000 x 13000 pixels, over the cap of 40 megapixels for one image" in result.stderr
    assert peak < BOUND, f"peak RSS {peak:.0f} MiB"


# --- the page ---------------------------------------------------------------------------

@contextlib.contextmanager
def page(model_path: Path, **kwargs):
    from skinlesion.app import server

    httpd = server.serve(model_path, "127.0.0.1", 0, **kwargs)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def request(port: int, path: str = "/api/info", *, data: bytes | None = None, host: str | None = None,
            name: str = "scan.jpg") -> tuple[int, dict]:
    headers = {"X-File-Name": name} if data is not None else {}
    if host is not None:
        headers["Host"] = host
    call = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers,
                                  method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(call, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_page_answers_only_to_its_own_names(kit):
    with page(kit.model, allow_hosts=("lesions.example",)) as port:
        assert request(port)[0] == 200  # urllib sends Host: 127.0.0.1:PORT
        for host in (f"localhost:{port}", f"[::1]:{port}", "lesions.example"):
            assert request(port, host=host)[0] == 200, host
        for host in ("attacker.example", f"attacker.example:{port}", "localhost.attacker.example"):
            status, answer = request(port, host=host)
            assert status == 403 and "is not a name of this server" in answer["error"], host
        status, _ = request(port, "/api/predict", data=kit.image.read_bytes(), host="attacker.example")
        assert status == 403


def test_the_page_refuses_an_image_past_the_pixel_cap(kit, tmp_path):
    with page(kit.model) as port:
        status, answer = request(port, "/api/predict", data=huge_png(tmp_path / "huge.png").read_bytes(),
                                 name="huge.png")
    assert status == 422 and "13000 x 13000 pixels, over the cap of 40 megapixels" in answer["error"]


@pytest.mark.slow
def test_fifty_concurrent_uploads_are_each_answered_or_told_to_wait(kit, monkeypatch):
    from skinlesion.app import server

    monkeypatch.setattr(server, "ADMITTED", 4)
    data = kit.image.read_bytes()
    answers: list = []

    def upload():
        try:
            answers.append(request(port, "/api/predict", data=data)[0])
        except (TimeoutError, urllib.error.URLError, ConnectionError) as error:
            answers.append(repr(error))

    with page(kit.model) as port:
        workers = [threading.Thread(target=upload) for _ in range(50)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
        assert request(port, "/api/predict", data=data)[0] == 200  # and it goes on serving
    assert len(answers) == 50 and set(answers) <= {200, 503}, answers
    assert answers.count(200) >= 4


@pytest.mark.slow
def test_the_pages_memory_stays_bounded_under_concurrent_huge_uploads(kit, tmp_path):
    from tests.test_app import serving

    png = huge_png(tmp_path / "huge.png").read_bytes()
    with serving(kit.model) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        pid = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _serves(p, str(kit.model)))
        threads = [threading.Thread(target=request, args=(port, "/api/predict"), kwargs={"data": png, "name": "h.png"})
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        peak = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmHWM"))) / 1024
    assert peak < BOUND, f"the server's peak RSS was {peak:.0f} MiB"


def _serves(process: Path, model: str) -> bool:
    try:
        command = (process / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"skinlesion.app" in command and model.encode() in command


# --- silent wrong answers ---------------------------------------------------------------

METADATA_TABLES = {
    "capitalised header": ("image_id,Age,Sex,Localization\n{id},50,male,back\n", "column 'Age' looks like 'age'"),
    "gender for sex": ("image_id,age,gender,localization\n{id},50,male,back\n", "column 'gender' looks like 'sex'"),
    "site beside localization": ("image_id,age,sex,localization,site\n{id},50,male,back,face\n",
                                 "column 'site' looks like 'localization'; there is a column by that name too"),
    "none of the columns": ("name,years_old\n{id},50\n", "no image_id, age, sex, localization columns"),
    "a duplicated image_id": ("image_id,age,sex,localization\n{id},50,male,back\n{id},70,female,face\n",
                              "image_id {id} is on lines 2, 3; give one row per image"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(METADATA_TABLES))
def test_a_metadata_table_that_would_be_read_as_unknown_is_refused(kit, tmp_path, case):
    table, message = METADATA_TABLES[case]
    image_id = kit.image.stem
    (tmp_path / "patients.csv").write_text(table.format(id=image_id))
    result = run([*PREDICT, metadata_model(tmp_path / "meta.pt"), kit.image, "--metadata", tmp_path / "patients.csv",
                  "-o", tmp_path / "out.csv"], tmp_path)
    assert_one_line(result, 2, message.format(id=image_id))
    assert not (tmp_path / "out.csv").exists()


MODEL_FIELDS = {
    "std of zeros": ({"std": [0, 0, 0]}, "std.0 is 0: input should be greater than 0"),
    "a temperature of 0": ({"scoring": {"tta": "none", "tau": 0.0, "log_prior": None, "temperature": 0.0}},
                           "scoring.temperature is 0.0: input should be greater than 0"),
    "image_size 60000": ({"image_size": 60000}, "image_size is 60000: input should be less than or equal to 1024"),
    "image_size -5": ({"image_size": -5}, "image_size is -5"),
    "image_size as text": ({"image_size": "32"}, "image_size is '32': input should be a valid integer"),
    "mean as text": ({"mean": "abc"}, "mean is 'abc': input should be a valid list"),
    "an unknown architecture": ({"architecture": "resnet1000"}, "architecture is 'resnet1000'"),
    "settings for a huge network": ({"settings": {"channels": [2**20] * 3}}, "its weights do not fit"),
    "NaN weights": ("nan", "its weights hold NaN or infinite values"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MODEL_FIELDS))
def test_a_model_file_with_a_field_out_of_its_schema_is_refused_in_one_line(kit, tmp_path, case):
    change, message = MODEL_FIELDS[case]
    payload = torch.load(kit.model, weights_only=True)
    if change == "nan":
        payload["state_dict"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                                 for k, v in payload["state_dict"].items()}
    else:
        payload.update(change)
    torch.save(payload, tmp_path / "edited.pt")
    result, peak = peak_run([*PREDICT, tmp_path / "edited.pt", kit.image, "-o", tmp_path / "out.csv"], tmp_path)
    assert_one_line(result, 2, message)
    assert peak < BOUND, f"peak RSS {peak:.0f} MiB"


@pytest.mark.slow
def test_an_onnx_file_with_bad_metadata_is_refused_in_one_line(kit, tmp_path):
    import onnx

    from skinlesion.deployment import export

    model, info = modelfile.load(kit.model)
    export.export(model, info, tmp_path / "model.onnx")
    for key, value, message in (("image_size", "abc", "its metadata field image_size is not JSON"),
                                ("std", "[0, 0, 0]", "std.0 is 0: input should be greater than 0"),
                                ("image_size", "60000", "image_size is 60000")):
        proto = onnx.load(tmp_path / "model.onnx")
        for prop in proto.metadata_props:
            if prop.key == key:
                prop.value = value
        onnx.save(proto, tmp_path / "edited.onnx")
        result = run([*PREDICT, tmp_path / "edited.onnx", kit.image, "-o", tmp_path / "out.csv"], tmp_path)
        assert_one_line(result, 2, message)


# --- params, training, leftovers ---------------------------------------------------------

def project_copy(kit, tmp_path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(kit.project, project)
    return project


@pytest.mark.slow
@pytest.mark.parametrize("text, message", [
    ("trian:\n  lr: 0.1\n", "'trian' is not a param group of this pipeline (did you mean 'train'?)"),
    ("modle: resnet18\n", "'modle' is not a param group of this pipeline (did you mean 'model'?)"),
    ("".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'x'}]\n" for i in range(10)),
     "params.yaml is not valid YAML: uses the alias *l0 (aliases are not allowed here: write the values out) at line"),
])
def test_a_params_file_with_an_unknown_group_or_an_alias_bomb_is_one_short_line(kit, tmp_path, text, message):
    project = project_copy(kit, tmp_path)
    with open(project / "params.yaml", "a") as handle:
        handle.write(text)
    result, peak = peak_run([sys.executable, "-m", "stages.prepare"], project)
    assert_one_line(result, 1, message)
    assert len(result.stderr) < 600 and peak < BOUND


def trained_data(project: Path) -> None:
    for stage in ("download", "prepare", "split", "balance"):
        assert run_stage(project, stage).returncode == 0


@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_naming_the_learning_rate(synthetic_zips, tmp_path):
    project = make_project(tmp_path / "project", synthetic_zips)
    trained_data(project)
    set_params(project, {"train.lr": 1.0e30, "train.epochs": 3, "model": "simple_cnn", "train.metadata": False,
                         "train.batch_size": 2})
    result = run_stage(project, "train@42")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "(train.lr is 1e+30): training diverged; lower train.lr (e.g. to 1e+29)" in errors[0]


@pytest.mark.slow
def test_a_damaged_checkpoint_is_set_aside_and_training_starts_over(synthetic_zips, tmp_path):
    project = make_project(tmp_path / "project", synthetic_zips)
    trained_data(project)
    set_params(project, {"train.epochs": 1, "model": "simple_cnn", "train.metadata": False, "train.batch_size": 4})
    checkpoints = project / "models/checkpoints/42"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint any more")
    result = run_stage(project, "train@42")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "the checkpoint models/checkpoints/42/last.pt is damaged" in result.stderr
    assert "training starts over" in result.stderr
    assert (checkpoints / "last.pt.damaged").exists() and (project / "models/members/42.pt").is_file()


@pytest.mark.slow
def test_a_killed_stages_leftovers_are_ignored_by_git_and_removed_by_its_next_run(kit, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(kit.project, project)
    run(["git", "init", "-q"], project)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is nobody's now
    leftovers = [project / f"data/.raw.{dead.pid}-0a1b2c3d.tmp", project / f"data/.raw.{dead.pid}-0a1b2c3d.scratch",
                 project / f"data/.prepared.{dead.pid}-0a1b2c3d.tmp"]
    for folder in leftovers:
        (folder / "images").mkdir(parents=True)
        (folder / "images/ISIC_0000000.jpg").write_bytes(b"x" * 1000)
    alive = project / f"data/.raw.{os.getpid()}-0a1b2c3d.tmp"  # a writer still at work keeps its own
    alive.mkdir()
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], project).stdout
    assert ".tmp" not in status and ".scratch" not in status, status
    assert run_stage(project, "download").returncode == 0
    assert not leftovers[0].exists() and not leftovers[1].exists() and leftovers[2].exists() and alive.exists()
    assert run_stage(project, "prepare").returncode == 0
    assert not leftovers[2].exists() and alive.exists()


def test_an_external_set_that_is_the_pipelines_own_data_is_named(tmp_path):
    from skinlesion.data.prepare import prepare
    from skinlesion.evaluation.external import OwnData, shared_with
    from skinlesion.synthetic import make_dataset

    make_dataset(tmp_path / "ham", lesions_per_class=1, max_images_per_lesion=1)
    download.download(group("download", source="local", path=str(tmp_path / "ham"), retries=0, max_unpacked_gb=1),
                      tmp_path / "raw", tmp_path / "cache")
    prepare(tmp_path / "raw", tmp_path / "prepared", 16)
    own = OwnData.of(tmp_path / "prepared")
    frame = pd.read_csv(tmp_path / "raw/metadata.csv", dtype=str)
    pixels = np.load(tmp_path / "prepared/images.npy")
    renamed = frame.assign(image_id="X" + frame["image_id"], lesion_id="Y" + frame["lesion_id"])
    assert shared_with(own, renamed, pixels)["by_pixels"] == len(frame)  # copies under other names
    other = np.asarray(Image.new("RGB", (16, 16), "white"))[None].repeat(len(frame), 0)
    assert shared_with(own, renamed, other)["images"] == 0
    assert shared_with(own, frame, other) == {"images": len(frame), "by_image_id": len(frame),
                                              "by_lesion_id": len(frame), "by_pixels": 0}

"""No traceback for a user's mistake: each entry point (the stages through
cli.run_stage, and the prediction command) ends a bad run with one line saying what
is wrong, where, and how to fix it; the documented exit code; and no output left
behind. Every case is a real subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinlesion.cli import REPORT
from tests.conftest import PROJECT, set_params, unprivileged
from tests.conftest import run_command as run

pytestmark = pytest.mark.slow
PREDICT = [sys.executable, "-m", "skinlesion.predict"]
SCORE = [sys.executable, "-m", "skinlesion.score"]
def copy_of_ham(kit, tmp_path) -> Path:
    shutil.copytree(kit.ham, tmp_path / "ham")
    return tmp_path / "ham"


def semicolon_metadata(ham: Path) -> None:
    path = ham / "HAM10000_metadata.csv"
    pd.read_csv(path).to_csv(path, sep=";", index=False)


def unreadable(path: Path) -> Path:
    path.chmod(0)
    return path


def traversing_zip(tmp_path: Path) -> Path:
    with zipfile.ZipFile(tmp_path / "upload.zip", "w") as archive:
        archive.writestr("../escape.jpg", b"x")
    return tmp_path / "upload.zip"


def wrapped(patch: str, argv: list) -> list:
    """The prediction command with ``patch`` applied first: a full disk, or a bug."""
    arguments = [str(a) for a in argv]
    code = f"import errno, sys\n{patch}\nfrom skinlesion.predict import main\nsys.exit(main({arguments!r}))"
    return [sys.executable, "-c", code]


FULL_DISK = ("import os\ndef full(*args):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
             "os.replace = full")
A_BUG = ("import skinlesion.evaluation.inference as inference\n"
         "def broken(*args, **kwargs):\n    return 1 / 0\ninference.view_logits = broken")

# name: (make the command from kit and tmp_path, exit code, what the one line says, unprivileged)
PREDICT_CASES = {
    "empty model file": (lambda k, t: [*PREDICT, (t / "m.pt").touch() or t / "m.pt", k.image, "-o", t / "out.csv"],
                         2, "m.pt is empty (0 bytes), not a model file", False),
    "model is a JPEG": (lambda k, t: [*PREDICT, k.image, k.image, "-o", t / "out.csv"],
                        2, "ISIC_0024306.jpg: not a model file (not a PyTorch archive)", False),
    "model is a folder": (lambda k, t: [*PREDICT, k.ham, k.image, "-o", t / "out.csv"],
                          2, "ham is a folder, not a model file", False),
    "model is someone else's weights": (
        lambda k, t: [*PREDICT, torch.save({"weight": torch.zeros(2)}, t / "w.pt") or t / "w.pt", k.image,
                      "-o", t / "out.csv"], 2, "w.pt: not a skinlesion-model/1 file", False),
    "missing model": (lambda k, t: [*PREDICT, t / "nope.pt", k.image, "-o", t / "out.csv"],
                      2, "nope.pt: no such model file", False),
    "unreadable model": (lambda k, t: [*PREDICT, unreadable(Path(shutil.copy(k.model, t))), k.image,
                                       "-o", t / "out.csv"],
                         2, "model.pt: cannot read the model file (permission denied)", True),
    "-o names a folder": (lambda k, t: [*PREDICT, k.model, k.image, "-o", t],
                          2, "is a folder; name a file in it, e.g. -o", False),
    "-o in a read-only folder": (lambda k, t: [*PREDICT, k.model, k.image, "-o",
                                               (t / "ro").mkdir(0o555) or t / "ro/out.csv"],
                                 2, "cannot write into", True),
    "--batch-size 0": (lambda k, t: [*PREDICT, k.model, k.image, "-o", t / "out.csv", "--batch-size", "0"],
                       2, "argument --batch-size: 0 is below 1", False),
    "--batch-size -1": (lambda k, t: [*PREDICT, k.model, k.image, "-o", t / "out.csv", "--batch-size=-1"],
                        2, "argument --batch-size: -1 is below 1", False),
    "--batch-size x": (lambda k, t: [*PREDICT, k.model, k.image, "-o", t / "out.csv", "--batch-size", "x"],
                       2, "argument --batch-size: 'x' is not a whole number", False),
    "--mel-specificity 2": (lambda k, t: [*SCORE, k.model, k.ham, "-o", t / "out.csv",
                                          "--mel-specificity", "2"], 2, "is not between 0 and 1", False),
    "no -o": (lambda k, t: [*PREDICT, k.model, k.image], 2, "the following arguments are required: -o", False),
    "--labels missing": (lambda k, t: [*SCORE, k.model, k.ham, "--labels", t / "test.csv",
                                       "-o", t / "out.csv"], 2, "--labels", False),
    "--labels without --score": (lambda k, t: [*PREDICT, k.model, k.ham, "--labels", k.ham / "HAM10000_metadata.csv",
                                               "-o", t / "out.csv"], 2, "--labels applies to scoring", False),
    "missing input": (lambda k, t: [*PREDICT, k.model, t / "scans", "-o", t / "out.csv"],
                      2, "scans: no such file or folder", False),
    "input is a broken link": (lambda k, t: [*PREDICT, k.model, (t / "l.jpg").symlink_to(t / "gone.jpg") or t / "l.jpg",
                                             "-o", t / "out.csv"], 2, "l.jpg is a broken link", False),
    "empty folder": (lambda k, t: [*PREDICT, k.model, (t / "scans").mkdir() or t / "scans", "-o", t / "out.csv"],
                     2, "no files to classify in", False),
    "unreadable folder": (lambda k, t: [*PREDICT, k.model, unreadable(copy_of_ham(k, t) / "HAM10000_images_part_1"),
                                        "-o", t / "out.csv"], 2, "cannot list this folder (permission denied", True),
    "zip escaping its folder": (lambda k, t: [*PREDICT, k.model, traversing_zip(t), "-o", t / "out.csv"],
                                2, "points outside the folder", False),
    "--score: ;-separated metadata": (
        lambda k, t: [*SCORE, k.model, semicolon_metadata(copy_of_ham(k, t)) or t / "ham",
                      "-o", t / "out.csv"], 2, "looks ';'-separated", False),
    "--score: unreadable metadata": (
        lambda k, t: [*SCORE, k.model, unreadable(copy_of_ham(k, t) / "HAM10000_metadata.csv").parent,
                      "-o", t / "out.csv"], 2, "HAM10000_metadata.csv: cannot be read (permission denied)", True),
    "full disk": (lambda k, t: wrapped(FULL_DISK, [k.model, k.image, "-o", t / "out.csv"]),
                  1, "no space left on device writing", False),
}


INFO = ("classifying ", "skipped ")  # the prediction command's log lines before the work


def assert_one_line(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    shown = f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert result.returncode == code, shown
    assert "Traceback" not in result.stderr, shown
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], shown
    assert all(line.startswith(("error:", *INFO)) for line in result.stderr.strip().splitlines()), shown


def leftovers(folder: Path) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.name.endswith(".tmp") or path.name.startswith("out.")]


@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_the_prediction_command_explains_a_bad_run_in_one_line(kit, tmp_path, case):
    make, code, message, needs_permissions = PREDICT_CASES[case]
    command = make(kit, tmp_path)
    result = run(unprivileged(command) if needs_permissions else command, tmp_path)
    assert_one_line(result, code, message)
    assert not leftovers(tmp_path)


def test_a_bug_keeps_its_traceback_and_asks_to_be_reported(kit, tmp_path):
    result = run(wrapped(A_BUG, [kit.model, kit.image, "-o", tmp_path / "out.csv"]), tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {REPORT}"
    assert not leftovers(tmp_path)


def stage(name: str, patch: str | None = None) -> list:
    """`python -m stages.NAME`, or the same with ``patch`` applied first."""
    if patch is None:
        return [sys.executable, "-m", f"stages.{name}"]
    code = f"import errno, os, runpy\n{patch}\nrunpy.run_module('stages.{name}', run_name='__main__')"
    return [sys.executable, "-c", code]


def raw_data(kit, project: Path) -> None:
    result = run(stage("download"), project)
    assert result.returncode == 0, result.stderr


# name: (prepare the project, command, what the one line says, the output that must not exist, unprivileged);
# a stage's bad run exits 1.
STAGE_CASES = {
    "evaluate: empty model file": (
        lambda k, p: (p / "models").mkdir() or (p / "models/model.pt").touch(), stage("evaluate"),
        "error: evaluate: models/model.pt is empty (0 bytes)", "metrics/evaluate.json", False),
    "prepare before download": (
        lambda k, p: None, stage("prepare"),
        ("error: prepare: data/raw/metadata.csv: no such file or folder; `dvc repro prepare` runs the stages it "
         "needs first"), "data/prepared", False),
    "download: ;-separated metadata": (
        lambda k, p: semicolon_metadata(k.ham_copy), stage("download"), "looks ';'-separated", "data/raw", False),
    "download: an image stored as .png": (
        lambda k, p: Image.open(k.image_copy).save(k.image_copy.with_suffix(".png")) or k.image_copy.unlink(),
        stage("download"),
        ("1 image(s) listed in ham/HAM10000_metadata.csv are missing: ISIC_0024306; 1 of them are there under "
         "another extension"), "data/raw", False),
    "download: unreadable image": (
        lambda k, p: unreadable(k.image_copy), stage("download"),
        "ISIC_0024306.jpg cannot be read: permission denied", "data/raw", True),
    "download: unreadable metadata": (
        lambda k, p: unreadable(k.ham_copy / "HAM10000_metadata.csv"), stage("download"),
        "HAM10000_metadata.csv: cannot be read (permission denied)", "data/raw", True),
    "download: unreadable folder": (
        lambda k, p: unreadable(k.image_copy.parent), stage("download"),
        "HAM10000_images_part_1: cannot list this folder (permission denied", "data/raw", True),
    "params.yaml is not YAML": (
        lambda k, p: (p / "params.yaml").write_text("prepare: [16\n"), stage("prepare"),
        "error: prepare: params.yaml is not valid YAML", "data/prepared", False),
    "prepare into a read-only folder": (
        lambda k, p: raw_data(k, p) or (p / "data").chmod(0o555), stage("prepare"),
        "error: prepare: data: permission denied", "data/prepared", True),
    "prepare on a full disk": (
        lambda k, p: raw_data(k, p),
        stage("prepare", "def full(*args):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
                         "os.posix_fallocate = full"),
        "error: prepare: no space left on device writing data/prepared; free space", "data/prepared", False),
}


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_a_stage_explains_a_bad_run_in_one_line(kit, tmp_path, case):
    setup, command, message, output, needs_permissions = STAGE_CASES[case]
    project = tmp_path / "project"
    shutil.copytree(kit.project, project)
    ham = copy_of_ham(kit, tmp_path)
    set_params(project, {"download.path": str(ham)})
    setup(SimpleNamespace(**vars(kit), ham_copy=ham, image_copy=ham / kit.image.relative_to(kit.ham)), project)
    result = run(unprivileged(command) if needs_permissions else command, project)
    assert_one_line(result, 1, message)
    assert not (project / output).exists()
    assert not [path for path in project.rglob("*.tmp")]


def test_a_stage_bug_keeps_its_traceback_and_asks_to_be_reported(kit, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(kit.project, project)
    result = run(stage("prepare", "import skinlesion.data.prepare as p\np.prepare = lambda *a: 1 / 0"), project)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: prepare: {REPORT}"


def test_ctrl_c_stops_the_prediction_command_with_130_and_no_output(kit, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8))
    big.save(folder / "0.jpg", quality=90)
    for number in range(1, 3000):  # long enough to be interrupted: a few seconds of decoding
        os.link(folder / "0.jpg", folder / f"{number}.jpg")
    env = {**os.environ, "SKINLESION_PROGRESS": "0", "PYTHONPATH": str(PROJECT)}
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT:
    # the child gets the default disposition back, as a command typed in a terminal has it.
    process = subprocess.Popen([*PREDICT, str(kit.model), str(folder), "-o", str(tmp_path / "out.csv")],
                               cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("classifying"):
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=60)[1]
    stderr = "".join(seen) + rest
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted; no partial output was kept"
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("error, line", [
    (ValueError("bad header\nline 2 of the parser's story"), "bad header"),
    (ValueError("\n\n  padded  \nmore"), "padded"),
    (ValueError(""), "ValueError"),  # an empty message: the type, not an IndexError's traceback
    (RuntimeError("Error(s) in loading state_dict for Classifier:\n\tsize mismatch for head.weight"),
     "size mismatch for head.weight"),  # torch's header says nothing
    (OSError("name with \x1b[31m escape"), "name with \\x1b[31m escape"),  # a terminal escape is shown, not run
])
def test_every_one_line_refusal_quotes_an_error_by_the_same_rule(error, line):
    from skinlesion.untrusted import first_line
    assert first_line(error) == line

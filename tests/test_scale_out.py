"""Scaling out with the engines built for it: torchrun/DDP training, a DVC remote,
and DVC's experiment queue; all on CPU, in throwaway git+DVC repositories."""

from __future__ import annotations

import json
import subprocess
import time

import pandas as pd
import pytest

from skinlesion import modelfile
from skinlesion.data import patient
from skinlesion.training import models
from tests.conftest import make_project, run

pytestmark = pytest.mark.slow  # real git+DVC projects and processes


@pytest.fixture(scope="module")
def project(synthetic_zips, tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("scale") / "project", synthetic_zips, {"train.epochs": 3})
    run(["dvc", "repro"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first run"], root)
    return root


def test_two_processes_under_torchrun_train_one_model(project):
    result = run(["dvc", "exp", "run", "-S", "train.nproc=2"], project)
    assert "weights identical on all 2 ranks" in result.stderr
    summary = json.loads((project / "metrics/train/42/metrics.json").read_text())
    assert summary["processes"] == 2 and summary["epochs_run"] == 3
    model, info = modelfile.load(project / "models/model.pt")  # one model file, loadable
    assert info.architecture == "simple_cnn"
    loss = pd.read_csv(project / "metrics/train/42/plots/metrics/train/loss.tsv", sep="\t")["loss"]
    assert list(loss.index) == [0, 1, 2] and loss.iloc[-1] < loss.iloc[0]
    assert result.stderr.count("epoch 1/3") == 1  # only rank 0 logs
    run(["git", "checkout", "--", "."], project)
    run(["dvc", "checkout", "--force"], project)


def test_ranks_stop_early_together(project):
    """Early stopping is decided on reduced scores, the same on every rank; a rank that
    left the loop alone would leave the other waiting in a collective until the timeout."""
    # lr ~ 0: only the BatchNorm statistics move the validation score, and with this seed
    # and the images alone it does not improve after epoch 1 (the run is deterministic)
    result = run(["dvc", "exp", "run", "-S", "train.nproc=2", "-S", "train.lr=1e-12", "-S", "train.scheduler=none",
                  "-S", "train.warmup_epochs=0", "-S", "train.early_stopping_patience=1", "-S", "train.epochs=4",
                  "-S", "train.metadata=false"], project, timeout=300)
    assert "early stop" in result.stderr and "weights identical on all 2 ranks" in result.stderr
    assert json.loads((project / "metrics/train/42/metrics.json").read_text())["epochs_run"] == 2
    run(["git", "checkout", "--", "."], project)
    run(["dvc", "checkout", "--force"], project)


def test_remote_push_then_fresh_clone_pull_has_nothing_to_do(project, tmp_path):
    storage = tmp_path / "storage"
    run(["dvc", "remote", "add", "-d", "shared", str(storage)], project)
    run(["git", "commit", "-qam", "add a remote"], project)
    run(["dvc", "push"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert (clone / "data/balanced/images.npy").exists() and (clone / "models/model.pt").exists()
    status = run(["dvc", "status", "--json"], clone).stdout
    assert json.loads(status) == {}
    assert "Running stage" not in run(["dvc", "repro"], clone).stdout


def test_queued_experiments_run_in_parallel_and_are_listed(project):
    run(["dvc", "exp", "run", "--queue", "-S", "model=resnet18,efficientnet_b0"], project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    runs = [entry for entry in _entries(shown) if entry.get("name") and "params" in entry.get("data", {})]
    trained = {}
    for entry in runs:
        data = entry["data"]
        chosen = data["params"]["params.yaml"]["data"]["model"]
        summary = data.get("metrics", {}).get("metrics/train/42/metrics.json", {}).get("data", {})
        trained[chosen] = summary.get("parameters")
    # each queued run trained the model it was given (its own parameter count), not the baseline's
    width = patient.width(patient.encoding())  # the defaults take the patient's metadata
    for name in ("resnet18", "efficientnet_b0"):
        assert trained.get(name) == models.parameter_count(models.build(
            name, num_classes=7, image_size=32, settings={}, head={"hidden": 256, "dropout": 0.3}, patient_width=width))
    subprocess.run(["dvc", "queue", "stop"], cwd=project, capture_output=True)


def _entries(node):
    """Every revision and experiment entry of `dvc exp show --json`, however nested."""
    if isinstance(node, list):
        for item in node:
            yield from _entries(item)
    elif isinstance(node, dict):
        if "rev" in node:
            yield node
        for value in node.values():
            if isinstance(value, (list, dict)):
                yield from _entries(value)

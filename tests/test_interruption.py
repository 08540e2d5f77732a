"""Pull the plug on a real `dvc repro` in the middle of training: the next
`dvc repro` resumes from the last checkpoint instead of starting over."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pandas as pd
import pytest

from tests.conftest import make_project, run

pytestmark = pytest.mark.slow  # real git+DVC projects and processes


def test_killed_training_resumes_on_the_next_repro(synthetic_zips, tmp_path):
    project = make_project(tmp_path / "project", synthetic_zips,
                           {"model": "resnet18", "prepare.image_size": 64, "train.epochs": 12,
                            "train.early_stopping_patience": 0})
    run(["dvc", "repro", "balance"], project)
    checkpoint = project / "models/checkpoints/42/last.pt"
    process = subprocess.Popen(["dvc", "repro", "train"], cwd=project, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (project / "dvc.lock").exists() or "train@42:" not in (project / "dvc.lock").read_text()

    result = run(["dvc", "repro", "train"], project)
    resumed = [line for line in result.stderr.splitlines() if "resuming from the checkpoint after epoch" in line]
    assert resumed, result.stderr
    done = int(resumed[0].split("after epoch ")[1].split()[0])
    assert 1 <= done < 12
    epochs = pd.read_csv(project / "metrics/train/42/plots/metrics/val/balanced_accuracy.tsv", sep="\t")["step"]
    assert list(epochs) == list(range(1, 13))  # each epoch logged once, none lost, none repeated
    assert f"epoch {done + 1}/12" in result.stderr and "epoch 1/12" not in result.stderr
    assert (project / "models/members/42.pt").exists()
    assert "train@42:" in (project / "dvc.lock").read_text()

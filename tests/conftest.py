"""Shared fixtures: synthetic HAM10000 copies, throwaway git+DVC projects, and a
real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skinlesion import synthetic
from skinlesion.params import set_values as set_params  # noqa: F401 - the tests import it from here

PROJECT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "skinlesion", ".dvcignore", ".gitignore")

# Progress bars would only clutter captured output; DVC's analytics would start a
# daemon per command that tries to reach the network.
os.environ["SKINLESION_PROGRESS"] = "0"
os.environ["DVC_NO_ANALYTICS"] = "1"


@pytest.fixture(scope="session")
def synthetic_zips(tmp_path_factory) -> Path:
    """A synthetic copy laid out like ../shared/ham10000: metadata CSV and two zips."""
    folder = tmp_path_factory.mktemp("synthetic_zips")
    synthetic.make_dataset(folder, layout="zips")
    return folder


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> Path:
    """A synthetic copy laid out as loose files in part folders, like the official set."""
    folder = tmp_path_factory.mktemp("synthetic_folder")
    synthetic.make_dataset(folder, layout="folder")
    return folder


def run(args, cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def make_project(root: Path, source: Path, overrides: dict | None = None) -> Path:
    """A git+DVC repository holding the project's pipeline, reading ``source`` (a local
    HAM10000 copy) at a small working size. Returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = PROJECT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, root / name)
    # The recipe (model, balancing, sampler, augmentation, TTA) is pinned so the tests do
    # not follow the default recipe: they check the stages' behaviour, on the cheapest model.
    set_params(root, {"download.source": "local", "download.path": str(source), "model": "simple_cnn",
                      "prepare.image_size": 32, "balance.strategy": "threshold", "balance.target_per_class": 12,
                      "train.sampler": "shuffle", "train.augment": "flips", "calibrate.tta": "none",
                      "train.epochs": 1, "train.batch_size": 16, "models.fixcaps.kernel": 9,
                      "models.vit_b_16.layers": 2, "models.vit_b_16.heads": 2, "models.vit_b_16.hidden_dim": 32,
                      "models.vit_b_16.mlp_dim": 64,
                      **(overrides or {})})
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run(["dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline"], root)
    return root


def run_stage(project: Path, stage: str, check: bool = False) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"stages.{stage}"], project, check=check)


@pytest.fixture()
def http_server():
    from tests.httpserver import FileServer

    server = FileServer()
    yield server
    server.close()

"""Shared fixtures: synthetic HAM10000 copies, throwaway git+DVC projects, a real
HTTP server on 127.0.0.1, and a small model with a tiny data set for the commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from skinlesion import synthetic
from skinlesion.params import set_values as set_params  # noqa: F401 - the tests import it from here

PROJECT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "skinlesion", ".dvcignore", ".gitignore")

# Progress bars would only clutter captured output; DVC's analytics would start a
# daemon per command that tries to reach the network.
os.environ["SKINLESION_PROGRESS"] = "0"
os.environ["DVC_NO_ANALYTICS"] = "1"


def group(name: str, **values):
    """The typed param group ``name`` of the shipped params.yaml, with ``values`` changed."""
    import yaml

    from skinlesion import params

    shipped = yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))[name]
    return params.typed(params.schema_at(name), {**shipped, **values}, name)


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
                      "train.sampler": "shuffle", "train.augment": "flips", "train.ema": 0.0,
                      "train.select": "balanced_accuracy", "calibrate.tta": "none",
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
    """``stage`` by its script; ``train@SEED`` as DVC runs it (``python -m stages.train SEED``)."""
    name, _, item = stage.partition("@")
    return run([sys.executable, "-m", f"stages.{name}", *([item] if item else [])], project, check=check)


@pytest.fixture()
def http_server():
    from tests.httpserver import FileServer

    server = FileServer()
    yield server
    server.close()


DROPPED = "-dac_override,-dac_read_search"


def unprivileged(command: list) -> list:
    """``command`` without root's power to read and write anything, so that file
    permissions apply as they do to any user."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    return ["setpriv", f"--inh-caps={DROPPED}", f"--bounding-set={DROPPED}", *command]


def run_command(command: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """``command`` run in ``cwd`` on this checkout's code, without progress bars."""
    env = {**os.environ, "SKINLESION_PROGRESS": "0", "PYTHONPATH": str(PROJECT)}
    return subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, check=False, **kwargs)


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    """A random-weight simple_cnn model file at 32 px, a seven-image HAM10000 copy
    (loose files, with masks) and a copy of the project's pipeline reading it at 16 px."""
    import torch

    from skinlesion import CLASSES, modelfile
    from skinlesion.training import models

    root = tmp_path_factory.mktemp("kit")
    torch.manual_seed(0)
    head = {"hidden": 8, "dropout": 0}
    model = models.build("simple_cnn", num_classes=7, image_size=32, settings={}, head=head)
    modelfile.save(root / "model.pt", model, architecture="simple_cnn", settings={}, head=head, classes=CLASSES,
                   image_size=32, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, training={})
    synthetic.make_dataset(root / "ham", lesions_per_class=1, max_images_per_lesion=1)
    project = root / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, project / name)
    set_params(project, {"download.source": "local", "download.path": str(root / "ham"), "prepare.image_size": 16})
    return SimpleNamespace(model=root / "model.pt", ham=root / "ham", project=project,
                           image=root / "ham/HAM10000_images_part_1/ISIC_0024306.jpg")

"""The package's layers point one way: a module imports only from its own layer or
below (lazy imports too, by the import walk of tests/test_code_deps.py). Shared code
sits below the code that uses it: the networks, devices and metrics below training
and evaluation, the model file below both."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_code_deps import PROJECT, imported

# Lowest first. A module is in the first layer one of whose prefixes its path starts with.
LAYERS = [
    ("core", ["skinlesion/__init__.py", "skinlesion/untrusted.py", "skinlesion/files.py", "skinlesion/progress.py",
              "skinlesion/params.py", "skinlesion/modelinfo.py", "skinlesion/plots.py", "skinlesion/cli.py",
              "skinlesion/synthetic.py"]),
    ("data", ["skinlesion/data/"]),
    ("networks", ["skinlesion/training/__init__.py", "skinlesion/training/models.py", "skinlesion/training/devices.py",
                  "skinlesion/evaluation/__init__.py", "skinlesion/evaluation/metrics.py"]),
    ("model file", ["skinlesion/modelfile.py"]),
    ("training", ["skinlesion/training/"]),
    ("evaluation", ["skinlesion/evaluation/"]),
    ("deployment", ["skinlesion/deployment/"]),
    ("commands", ["skinlesion/predict.py", "skinlesion/score.py", "skinlesion/tune.py"]),
    ("page", ["skinlesion/app/"]),
]


def layer_of(path: str) -> int:
    for level, (_name, prefixes) in enumerate(LAYERS):
        if any(path == prefix or (prefix.endswith("/") and path.startswith(prefix)) for prefix in prefixes):
            return level
    raise AssertionError(f"{path} is in no layer of tests/test_layers.py; add it to LAYERS")


def upward_imports(root: Path = PROJECT) -> list[str]:
    """Every import from a lower layer to a higher one, as 'a (layer) -> b (layer)'."""
    found = []
    for file in sorted((root / "skinlesion").rglob("*.py")):
        source = str(file.relative_to(root))
        for target in sorted(imported(file)):
            target = str(target.relative_to(root))
            if layer_of(target) > layer_of(source):
                found.append(f"{source} ({LAYERS[layer_of(source)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})")
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports() == []


def test_every_module_has_a_layer():
    for file in (PROJECT / "skinlesion").rglob("*.py"):
        layer_of(str(file.relative_to(PROJECT)))


def test_a_planted_upward_import_is_found(tmp_path, monkeypatch):
    # data/ importing the evaluation layer, lazily inside a function, is caught.
    import shutil

    import tests.test_code_deps as deps

    copy = tmp_path / "project"
    shutil.copytree(PROJECT / "skinlesion", copy / "skinlesion", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "skinlesion/data/split.py"
    target.write_text(target.read_text() + "\n\ndef _late():\n    from skinlesion.evaluation import metrics\n")
    monkeypatch.setattr(deps, "PROJECT", copy)
    found = upward_imports(copy)
    assert found == ["skinlesion/data/split.py (data) -> skinlesion/evaluation/__init__.py (networks)",
                     "skinlesion/data/split.py (data) -> skinlesion/evaluation/metrics.py (networks)"]


@pytest.mark.parametrize("path, level", [("skinlesion/training/train.py", "training"),
                                         ("skinlesion/training/models.py", "networks"),
                                         ("skinlesion/evaluation/metrics.py", "networks"),
                                         ("skinlesion/app/server.py", "page")])
def test_the_layers_place_the_shared_modules_below_their_users(path, level):
    assert LAYERS[layer_of(path)][0] == level

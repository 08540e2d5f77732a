"""Stages read exactly the params dvc.yaml declares for them."""

from __future__ import annotations

import ast

import pytest
import yaml

from skinlesion import PipelineError, params
from tests.conftest import PROJECT


def test_loader_returns_only_declared_params(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"a": {"cmd": "x", "params": ["split", "model", {"params.yaml": ["balance.seed"]}]}}}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"model": "resnet18", "split": {"seed": 1}, "balance": {"seed": 2, "target_per_class": 5}}))
    loaded = params.load("a", tmp_path)
    assert loaded == {"model": "resnet18", "split": {"seed": 1}, "balance": {"seed": 2}}
    with pytest.raises(PipelineError, match="stage 'a' read param 'prepare', which dvc.yaml does not declare"):
        loaded["prepare"]


def test_declared_but_absent_param_is_an_error(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"a": {"cmd": "x", "params": ["nope.x"]}}}))
    (tmp_path / "params.yaml").write_text("model: a\n")
    with pytest.raises(PipelineError, match="params.yaml has no 'nope.x'"):
        params.load("a", tmp_path)


def test_every_stage_script_reads_only_its_own_groups():
    """Each stage script subscripts ``params`` with group names; those must be exactly
    what dvc.yaml declares for it (no more: reruns would be missed; no fewer: spurious reruns)."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        script = PROJECT / "stages" / f"{name}.py"
        tree = ast.parse(script.read_text())
        read = {node.slice.value for node in ast.walk(tree)
                if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id == "params" and isinstance(node.slice, ast.Constant)}
        declared = {entry.split(".")[0] for entry in spec.get("params", [])}
        assert read == declared, f"stage {name}: reads {read}, declares {declared}"
        assert spec["cmd"] == f"python -m stages.{name}" and f"stages/{name}.py" in spec["deps"]


@pytest.mark.parametrize("key, value, message", [
    ("download.retries", "5", r"download.retries is '5' \(str\); expected a whole number"),
    ("split.val_fraction", "0.15", r"split.val_fraction is '0.15' \(str\); expected a number"),
    ("prepare.image_size", 128.0, r"prepare.image_size is 128.0 \(float\); expected a whole number"),
    ("balance.seed", True, r"balance.seed is True \(bool\); expected a whole number"),
    ("evaluate.batch_size", 0, "evaluate.batch_size is 0; expected at least 1"),
    ("explain.method", 3, r"explain.method is 3 \(int\); expected text"),
    ("model", ["resnet18"], r"model is \['resnet18'\] \(list\); expected text"),
])
def test_wrong_param_types_are_named(tmp_path, key, value, message):
    import shutil

    from tests.conftest import set_params

    shutil.copy(PROJECT / "dvc.yaml", tmp_path)
    shutil.copy(PROJECT / "params.yaml", tmp_path)
    set_params(tmp_path, {key: value})
    stage = {"model": "train"}.get(key, key.split(".")[0])
    with pytest.raises(PipelineError, match=message):
        params.load(stage, tmp_path)


def test_the_shipped_params_pass_the_type_check():
    for stage in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]:
        params.load(stage, PROJECT)

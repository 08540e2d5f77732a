"""Stages read exactly the params dvc.yaml declares for them."""

from __future__ import annotations

import ast
from pathlib import Path

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

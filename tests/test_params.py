"""Stages read exactly the params dvc.yaml declares for them."""

from __future__ import annotations

import ast

import pytest
import yaml

from skinlesion import PipelineError, params
from tests.conftest import PROJECT


def test_loader_returns_only_declared_params(tmp_path):
    import shutil

    shutil.copy(PROJECT / "params.yaml", tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"a": {"cmd": "x", "params": ["split", "model", {"params.yaml": ["balance.seed"]}]}}}))
    shipped = yaml.safe_load((PROJECT / "params.yaml").read_text())
    loaded = params.load("a", tmp_path)
    assert loaded.as_dict() == {"model": shipped["model"], "split": shipped["split"],
                                "balance": {"seed": shipped["balance"]["seed"]}}
    assert isinstance(loaded.split, params.Split) and loaded.split.seed == shipped["split"]["seed"]
    assert loaded.balance.seed == shipped["balance"]["seed"]
    with pytest.raises(PipelineError, match="stage 'a' read param 'prepare', which dvc.yaml does not declare"):
        _ = loaded.prepare
    with pytest.raises(PipelineError, match="stage 'a' read param 'balance.strategy', which dvc.yaml does not"):
        _ = loaded.balance.strategy
    with pytest.raises(TypeError):  # no reading by string key
        loaded["split"]


def test_declared_but_absent_param_is_an_error(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"a": {"cmd": "x", "params": ["nope.x"]}}}))
    (tmp_path / "params.yaml").write_text("model: a\n")
    with pytest.raises(PipelineError, match="params.yaml has no 'nope.x'"):
        params.load("a", tmp_path)


def test_every_stage_script_reads_only_its_own_groups():
    """Each stage script reads groups off ``params`` (``params.train``; ``params.architecture``
    is ``models.${model}``); those must be exactly what dvc.yaml declares for it (no more:
    reruns would be missed; no fewer: spurious reruns)."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        script = PROJECT / "stages" / f"{name}.py"
        tree = ast.parse(script.read_text())
        read = {{"architecture": "models"}.get(node.attr, node.attr) for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params"}
        assert not [node for node in ast.walk(tree) if isinstance(node, ast.Subscript)
                    and isinstance(node.value, ast.Name) and node.value.id == "params"], f"stage {name}: params[...]"
        declared = {entry.split(".")[0] for entry in spec.get("params", [])}
        assert read == declared, f"stage {name}: reads {read}, declares {declared}"
        item = " ${item.seed}" if "matrix" in spec else ""  # train@SEED: one stage per member
        assert spec["cmd"] == f"python -m stages.{name}{item}" and f"stages/{name}.py" in spec["deps"]


@pytest.mark.parametrize("key, value, message", [
    # types
    ("download.retries", "5", r"download.retries is '5' \(str\); expected a whole number"),
    ("split.val_fraction", "0.15", r"split.val_fraction is '0.15' \(str\); expected a number"),
    ("prepare.image_size", 128.0, r"prepare.image_size is 128.0 \(float\); expected a whole number"),
    ("balance.seed", True, r"balance.seed is True \(bool\); expected a whole number"),
    ("balance.augment.hflip", 1, r"balance.augment.hflip is 1 \(int\); expected true or false"),
    ("model", ["resnet18"], r"model is \['resnet18'\]; expected one of simple_cnn, resnet18"),
    ("model", "resnet99", "model is 'resnet99'; expected one of simple_cnn, resnet18"),
    ("explain.method", 3, r"explain.method is 3; expected one of gradcam or gradcam\+\+"),
    ("train.optimizer", "lion", "train.optimizer is 'lion'; expected one of adam, adamw or sgd"),
    ("train.colour", 1, "train.colour is not a known param"),
    # ranges, each named with what it may be
    ("train.lr", 0, r"train.lr is 0; expected a number > 0"),
    ("train.lr", -0.001, r"train.lr is -0.001; expected a number > 0"),
    ("train.weight_decay", -0.1, r"train.weight_decay is -0.1; expected a number >= 0"),
    ("train.momentum", -0.9, r"train.momentum is -0.9; expected a number >= 0"),
    ("models.resnet18.head.dropout", 1.0, r"models.resnet18.head.dropout is 1.0; expected a number in \[0, 1\)"),
    ("models.resnet18.head.dropout", -0.1, r"models.resnet18.head.dropout is -0.1; expected a number in \[0, 1\)"),
    ("models.resnet18.head.hidden", -1, r"models.resnet18.head.hidden is -1; expected a whole number >= 0"),
    ("train.warmup_epochs", -1, r"train.warmup_epochs is -1; expected a whole number >= 0"),
    ("train.early_stopping_patience", -3, r"train.early_stopping_patience is -3; expected a whole number >= 0"),
    ("train.focal_gamma", -2.0, r"train.focal_gamma is -2.0; expected a number >= 0"),
    ("evaluate.mel_specificity", 1.0, r"evaluate.mel_specificity is 1.0; expected a number in \(0, 1\)"),
    ("evaluate.mel_specificity", 0, r"evaluate.mel_specificity is 0; expected a number in \(0, 1\)"),
    ("split.seed", -1, r"split.seed is -1; expected a whole number >= 0"),
    ("balance.seed", -1, r"balance.seed is -1; expected a whole number >= 0"),
    ("ensemble.seeds", [42, -1], r"ensemble.seeds.1 is -1; expected a (whole )?number >= 0"),
    ("ensemble.seeds", [3, 3], r"ensemble.seeds lists a seed twice \(\[3, 3\]\); each member needs its own"),
    ("ensemble.seeds", [], r"ensemble.seeds"),
    ("train.seed", 1, r"train.seed is now ensemble.seeds, one trained member per seed"),
    ("train.class_weights", True, r"train.class_weights: true with train.sampler: balanced corrects the class "
                                  r"imbalance twice; set train.sampler=shuffle"),
    ("evaluate.seed", -5, r"evaluate.seed is -5; expected a whole number >= 0"),
    ("explain.seed", -5, r"explain.seed is -5; expected a whole number >= 0"),
    ("download.max_unpacked_gb", 0, r"download.max_unpacked_gb is 0; expected a number > 0"),
    ("download.max_unpacked_gb", -1.5, r"download.max_unpacked_gb is -1.5; expected a number > 0"),
    ("prepare.image_size", 1, r"prepare.image_size is 1; expected a whole number in \[16, 1024\]"),
    ("split.val_fraction", 0.9, "split.val_fraction \\+ split.test_fraction = 1.05; they must leave something"),
    ("balance.target_per_class", 0, r"balance.target_per_class is 0; expected a whole number >= 1"),
    ("balance.augment.rotate", -5, r"balance.augment.rotate is -5; expected a number >= 0"),
    ("train.ema", 1.0, r"train.ema is 1.0; expected a number in \[0, 1\)"),
    ("train.precision", "int8", "train.precision is 'int8'; expected one of auto, fp32, bf16 or fp16"),
    ("calibrate.adjust", "f1", "calibrate.adjust is 'f1'; expected one of none, balanced_accuracy or mean_accuracy"),
    ("external.sources", [{"name": "a b", "path": "x"}],
     r"external.sources.0.name is 'a b'; use letters, digits, '_', '-' and '.', starting with a letter or digit"),
    ("external.sources", [{"name": "isic", "download": "isic2019"}],
     r"external.sources.0.download is 'isic2019'; expected one of isic2018_test"),
    ("external.sources", [{"name": "both", "path": "x", "download": "isic2018_test"}],
     r"external source 'both' needs either a path .* not both"),
    ("external.sources", [{"name": "neither"}], r"external source 'neither' needs either a path .* not neither"),
    ("external.sources", [{"name": "sources", "path": "x"}], r"external source name 'sources' is reserved"),
])
def test_a_bad_param_stops_its_stage_with_one_line_naming_it_and_its_range(tmp_path, key, value, message):
    import shutil

    from tests.conftest import set_params

    shutil.copy(PROJECT / "dvc.yaml", tmp_path)
    shutil.copy(PROJECT / "params.yaml", tmp_path)
    set_params(tmp_path, {key: value})
    stage = {"model": "train", "models": "train", "ensemble": "calibrate"}.get(key.split(".")[0], key.split(".")[0])
    with pytest.raises(PipelineError, match=f"^params.yaml: {message}") as error:
        params.load(stage, tmp_path)
    assert "\n" not in str(error.value)


def test_an_exponent_without_a_dot_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads ``lr: 1e-3`` as text; users write it, so it counts."""
    import shutil

    shutil.copy(PROJECT / "dvc.yaml", tmp_path)
    text = (PROJECT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("  lr: 0.002", "  lr: 1e-3", 1))
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["lr"] == "1e-3"
    assert params.load("train", tmp_path).train.lr == 0.001


def test_only_the_chosen_models_settings_are_declared_and_checked(tmp_path):
    import shutil

    from tests.conftest import set_params

    shutil.copy(PROJECT / "dvc.yaml", tmp_path)
    shutil.copy(PROJECT / "params.yaml", tmp_path)
    set_params(tmp_path, {"model": "resnet18", "models.fixcaps.channels": -1})
    loaded = params.load("train", tmp_path)
    assert list(loaded.as_dict()["models"]) == ["resnet18"]  # fixcaps' bad setting is not this run's business
    assert loaded.architecture == params.Torchvision(**shipped_models()["resnet18"])
    set_params(tmp_path, {"model": "fixcaps"})
    with pytest.raises(PipelineError, match="models.fixcaps.channels is -1; expected a whole number >= 1"):
        params.load("train", tmp_path)


def shipped_models() -> dict:
    return yaml.safe_load((PROJECT / "params.yaml").read_text())["models"]


def test_the_shipped_params_pass_the_type_check():
    for stage in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]:
        params.load(stage, PROJECT)


def test_defaults_exist_only_for_scoring_outside_the_pipeline_and_equal_params_yaml():
    """A default that differs from params.yaml, or stands in for a missing key, would make a
    stage run with a value nobody wrote: only ``evaluate`` and ``external`` have defaults
    (for ``predict --score``), and they are the shipped values."""
    from pydantic import BaseModel

    shipped = yaml.safe_load((PROJECT / "params.yaml").read_text())
    found = []

    def walk(model, values, path):
        for name, info in model.model_fields.items():
            dotted = f"{path}.{name}".lstrip(".")
            if not info.is_required():
                found.append(dotted)
                assert info.default == values[name], f"{dotted}: default {info.default!r}, params.yaml {values[name]!r}"
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(values.get(name), dict):
                walk(kind, values[name], dotted)

    walk(params.Params, shipped, "")
    assert found and {dotted.split(".")[0] for dotted in found} == {"evaluate", "external"}

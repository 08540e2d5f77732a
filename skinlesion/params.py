"""Read exactly the params a stage declares in ``dvc.yaml``.

A stage asks for its params by stage name; what it gets holds only the keys that
``dvc.yaml`` lists under that stage's ``params``. Reading anything else raises, so a
stage cannot silently depend on a param whose change would not rerun it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from skinlesion import PipelineError


NUMBER = (int, float)
SCHEMA: dict[str, type | tuple] = {
    # The types each param must have; the train group is checked in full by
    # skinlesion.training.check_config, architectures' settings by models.build.
    "model": str,
    "download.source": str, "download.path": str, "download.dataverse_server": str, "download.dataverse_doi": str,
    "download.isic2018_url": str, "download.cache_dir": str, "download.retries": int,
    "download.max_unpacked_gb": NUMBER,
    "prepare.image_size": int,
    "split.val_fraction": NUMBER, "split.test_fraction": NUMBER, "split.seed": int,
    "balance.strategy": str, "balance.target_per_class": int, "balance.seed": int, "balance.montage_per_class": int,
    "balance.augment": dict,
    "calibrate.tta": str, "calibrate.adjust": str, "calibrate.method": str, "calibrate.mel_sensitivity": NUMBER,
    "calibrate.batch_size": int,
    "evaluate.mel_specificity": NUMBER, "evaluate.batch_size": int,
    "evaluate.grid_per_class": int, "evaluate.seed": int,
    "explain.method": str, "explain.per_class": int, "explain.batch_size": int, "explain.seed": int,
    "models": dict, "train": dict,
}
_NAMES = {int: "a whole number", str: "text", dict: "a mapping", NUMBER: "a number"}


def check_types(values: dict, prefix: str = "") -> None:
    """Raise PipelineError for the first param whose value has the wrong type."""
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        expected = SCHEMA.get(dotted)
        if expected is not None:
            kinds = expected if isinstance(expected, tuple) else (expected,)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise PipelineError(f"params.yaml: {dotted} is {value!r} ({type(value).__name__}); "
                                    f"expected {_NAMES.get(expected, expected)}")
            if dotted.endswith("_size") or dotted.endswith("batch_size") or dotted.endswith("per_class"):
                if value < 1:
                    raise PipelineError(f"params.yaml: {dotted} is {value}; expected at least 1")
        elif isinstance(value, dict):
            check_types(value, f"{dotted}.")


class DeclaredParams(dict):
    """A params mapping that names the stage when code reads an undeclared key."""

    def __init__(self, stage: str, values: dict):
        super().__init__(values)
        self.stage = stage

    def __missing__(self, key):
        raise PipelineError(
            f"stage '{self.stage}' read param '{key}', which dvc.yaml does not declare "
            f"for it; add it to the stage's params in dvc.yaml"
        )


def _declared_keys(stage: str, dvc_yaml: Path) -> list[str]:
    try:
        spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{dvc_yaml} not found; run stages from the project root") from None
    stages = spec.get("stages", {})
    if stage not in stages:
        raise PipelineError(f"{dvc_yaml} has no stage '{stage}' (stages: {', '.join(stages)})")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {params-file: [keys]}: only params.yaml is used here
            for file, names in entry.items():
                if Path(file).name != "params.yaml":
                    raise PipelineError(f"stage '{stage}': params file {file} is not supported")
                keys.extend(names)
    return keys


def _lookup(values: dict, dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _interpolate(key: str, values: dict) -> str:
    """``models.${model}`` -> ``models.resnet18``, as DVC's templating reads it."""
    def value(match: re.Match) -> str:
        try:
            return str(_lookup(values, match.group(1)))
        except KeyError:
            raise PipelineError(f"dvc.yaml names ${{{match.group(1)}}}, which params.yaml does not have") from None

    return re.sub(r"\$\{([\w.]+)\}", value, key)


def load(stage: str, root: str | Path = ".") -> DeclaredParams:
    """Return the params ``stage`` declares, with dotted keys nested as in params.yaml."""
    root = Path(root)
    params_file = root / "params.yaml"
    try:
        values = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PipelineError(f"{params_file} not found; run stages from the project root") from None
    declared: dict[str, Any] = {}
    for key in _declared_keys(stage, root / "dvc.yaml"):
        key = _interpolate(key, values)
        node: Any = values
        parts = key.split(".")
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                raise PipelineError(f"params.yaml has no '{key}', which stage '{stage}' declares")
            node = node[part]
        target = declared
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = node
    check_types(declared)
    return DeclaredParams(stage, declared)

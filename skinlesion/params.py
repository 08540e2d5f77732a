"""Read exactly the params a stage declares in ``dvc.yaml``, checked in one place.

A stage asks for its params by stage name; what it gets holds only the keys that
``dvc.yaml`` lists under that stage's ``params`` (``models.${model}`` is read as DVC
templates it). Reading anything else raises, so a stage cannot silently depend on a
param whose change would not rerun it.

Every param's type, allowed values and range live in the typed groups below, and
nowhere else: a wrong value stops the stage before it starts, with one line naming
the param and what it may be.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from skinlesion import PipelineError
from skinlesion.untrusted import first_line, shown

TTA = ("none", "flips", "dihedral")

_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _yaml_exponent(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as text because it has no dot; users write it."""
    if isinstance(value, str) and _EXPONENT.match(value.strip()):
        return float(value)
    return value


Number = Annotated[float, BeforeValidator(_yaml_exponent)]
Positive = Annotated[Number, Field(gt=0)]
NonNegative = Annotated[Number, Field(ge=0)]
Fraction = Annotated[Number, Field(gt=0, lt=1)]   # strictly between 0 and 1
Rate = Annotated[Number, Field(ge=0, lt=1)]        # dropout, smoothing, a decay: 0 <= x < 1
Seed = Annotated[int, Field(ge=0)]
Count = Annotated[int, Field(ge=1)]
Whole = Annotated[int, Field(ge=0)]


class Group(BaseModel):
    # strict: no silent "5" -> 5 or 1 -> True; ints are still accepted where a number is
    model_config = ConfigDict(extra="forbid", strict=True)


class Download(Group):
    source: Literal["dataverse", "isic2018", "local"]
    path: str
    dataverse_server: str
    dataverse_doi: str
    isic2018_url: str
    cache_dir: str
    retries: Whole
    max_unpacked_gb: Positive


class Prepare(Group):
    image_size: Annotated[int, Field(ge=16, le=1024)]


class Split(Group):
    val_fraction: Fraction
    test_fraction: Fraction
    seed: Seed
    group_by: Literal["lesion", "image"]

    @model_validator(mode="after")
    def _leaves_a_train_split(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"split.val_fraction + split.test_fraction = {self.val_fraction + self.test_fraction:g}; "
                             f"they must leave something to train on (sum below 1)")
        return self


class Augment(Group):
    rotate: NonNegative
    scale: NonNegative
    shift: NonNegative
    hflip: bool
    vflip: bool
    brightness: NonNegative
    contrast: NonNegative
    hue: NonNegative
    saturation: NonNegative


class Balance(Group):
    strategy: Literal["none", "threshold"]
    target_per_class: Count
    seed: Seed
    montage_per_class: Whole
    augment: Augment


class Head(Group):
    hidden: Whole
    dropout: Rate


class SimpleCnn(Group):
    channels: Annotated[list[Count], Field(min_length=1)]
    dropout: Rate
    head: Head


class Torchvision(Group):
    head: Head


class VitB16(Group):
    layers: Count
    heads: Count
    hidden_dim: Count
    mlp_dim: Count
    head: Head


class ResnetTransformer(Group):
    backbone: Literal["resnet18", "resnet50"]
    dim: Count
    layers: Count
    heads: Count
    dropout: Rate
    head: Head


class FixCaps(Group):
    channels: Count
    kernel: Count
    stride: Count
    primary_types: Count
    primary_dim: Count
    class_dim: Count
    routing: Count


@dataclass(frozen=True)
class Architecture:
    """One entry of the registry of architectures, the one place that names one:

    - ``settings``: the type of its ``models.<name>`` params (a ``head`` field, if it has
      one, is the configurable classifier head that every such network ends in);
    - ``builder``: the function of ``skinlesion.training.models`` that builds the network
      (several names may share one builder with different settings);
    - ``pretrained``: whether ImageNet weights exist for it, so that ``train.pretrained``,
      ``train.weights_path`` and ``train.freeze`` mean something.

    The ``model`` param's names, the ``models`` group, the model file's check and the
    builder's lookup all derive from it; each network names its own Grad-CAM layers
    (``Classifier.cam_layers``), since they depend on its built shape."""

    settings: type[Group]
    builder: str
    pretrained: bool

    @property
    def head(self) -> bool:
        return "head" in self.settings.model_fields


# The one list of architectures: `model` takes these names, `models` holds their settings.
REGISTRY = {
    "simple_cnn": Architecture(SimpleCnn, "simple_cnn", pretrained=False),
    "resnet18": Architecture(Torchvision, "resnet18", pretrained=True),
    "resnet50": Architecture(Torchvision, "resnet50", pretrained=True),
    "efficientnet_b0": Architecture(Torchvision, "efficientnet_b0", pretrained=True),
    "vit_b_16": Architecture(VitB16, "vit_b_16", pretrained=True),
    "resnet_transformer": Architecture(ResnetTransformer, "resnet_transformer", pretrained=True),
    "fixcaps": Architecture(FixCaps, "fixcaps", pretrained=False),
}
ARCHITECTURES = tuple(REGISTRY)

Models = create_model("Models", __base__=Group, **{name: (entry.settings, ...) for name, entry in REGISTRY.items()})
Models.__doc__ = "Each architecture's own settings (``models.<name>``), one field per registry entry."


class Train(Group):
    pretrained: bool
    weights_path: str
    freeze: bool
    unfreeze_after_epochs: Whole
    epochs: Count
    batch_size: Count
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: Positive
    weight_decay: NonNegative
    momentum: NonNegative
    scheduler: Literal["none", "cosine", "onecycle", "plateau"]
    warmup_epochs: Whole
    loss: Literal["cross_entropy", "focal"]
    class_weights: bool
    focal_gamma: NonNegative
    label_smoothing: Rate
    sampler: Literal["shuffle", "balanced", "sqrt"]
    augment: Literal["none", "flips", "strong"]
    early_stopping_patience: Whole
    device: str
    nproc: Count
    deterministic: bool
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    ema: Rate
    select: Literal["macro_auc", "log_loss", "balanced_accuracy"]
    logit_adjust: NonNegative
    mixup: NonNegative
    cutmix: NonNegative
    metadata: bool

    @model_validator(mode="before")
    @classmethod
    def _seed_moved(cls, values):
        if isinstance(values, dict) and "seed" in values:
            raise ValueError("train.seed is now ensemble.seeds, one trained member per seed: write "
                             f"`ensemble: {{seeds: [{values['seed']}]}}` (or `-S 'ensemble.seeds=[{values['seed']}]'`)")
        return values

    @model_validator(mode="after")
    def _one_imbalance_remedy(self):
        # Loss weights of 1/count on batches a rebalancing sampler already drew would correct the
        # imbalance twice, weighting each class by about 1/count (balanced) or 1/sqrt(count) (sqrt):
        # a run with both called nearly every validation image a rare class (docs/architectures.md).
        if self.class_weights and self.sampler != "shuffle":
            raise ValueError(f"train.class_weights: true with train.sampler: {self.sampler} corrects the class "
                             "imbalance twice; set train.sampler=shuffle (weights alone) or "
                             "train.class_weights=false (the sampler alone)")
        return self


class Ensemble(Group):
    """One train stage per seed (``train@SEED``); calibrate combines the members."""
    seeds: Annotated[list[Seed], Field(min_length=1, max_length=32)]
    combine: Literal["probabilities", "logits"]

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds):
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"ensemble.seeds lists a seed twice ({seeds}); each member needs its own")
        return seeds


class Calibrate(Group):
    tta: Literal[TTA]
    adjust: Literal["none", "balanced_accuracy", "mean_accuracy"]
    method: Literal["none", "temperature", "auto"]
    mel_sensitivity: Fraction
    scope: Literal["none", "msp", "energy", "mahalanobis"]
    scope_features: Literal["stages", "last"]
    scope_retention: Fraction
    precision: Literal["auto", "fp32", "bf16"]
    recheck: Fraction
    batch_size: Count


class Evaluate(Group):
    # The defaults are the shipped params.yaml's (a test holds them equal), for scoring
    # outside the pipeline (python -m skinlesion.score) to give the evaluate
    # stage's numbers. No other group has defaults: a key missing from params.yaml is an error.
    mel_specificity: Fraction = 0.9
    bootstrap_resamples: Count = 1000
    bootstrap_seed: Seed = 42
    batch_size: Count = 128
    grid_per_class: Whole = 4
    seed: Seed = 42


class ExternalSource(Group):
    """A labelled set: a folder or zip in HAM10000 layout (``path``), or one the stage
    downloads (``download: isic2018_test``, the ISIC 2018 Task 3 test set)."""
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    path: str = ""
    download: Literal["isic2018_test"] | None = None

    @model_validator(mode="after")
    def _one_origin(self):
        if self.name == "sources":  # plots/external/sources.json lists the sets
            raise ValueError("external source name 'sources' is reserved; choose another name")
        if bool(self.path) == bool(self.download):
            raise ValueError(f"external source {self.name!r} needs either a path (a folder or zip in HAM10000 "
                             f"layout) or download: isic2018_test, not {'both' if self.path else 'neither'}")
        return self


class External(Group):
    sources: list[ExternalSource]
    isic2018_url: str = "https://isic-challenge-data.s3.amazonaws.com/2018"
    cache_dir: str = "data/downloads"
    retries: Whole = 5


class Scope(Group):
    per_kind: Count      # generated images of each kind, per out-of-scope set
    seed: Seed
    batch_size: Count


class Explain(Group):
    method: Literal["gradcam", "gradcam++"]
    per_class: Whole
    batch_size: Count
    seed: Seed


class Params(Group):
    """The whole of params.yaml."""

    model: Literal[ARCHITECTURES]
    download: Download
    prepare: Prepare
    split: Split
    balance: Balance
    models: Models
    train: Train
    ensemble: Ensemble
    calibrate: Calibrate
    evaluate: Evaluate
    external: External
    scope: Scope
    explain: Explain


# --- reading YAML ----------------------------------------------------------------------

class _NoAliases(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``): a params file has no need of
    them, and a few hundred bytes of nested aliases expand to gigabytes once validated
    or printed (the 'billion laughs')."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"uses the alias *{shown(event.anchor, 40)} (aliases are not allowed here: write the "
                            f"values out)", event.start_mark)
        return super().compose_node(parent, index)


def yaml_problem(error: yaml.YAMLError) -> str:
    """What a YAML error says, and where: one short line."""
    mark = getattr(error, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{shown(getattr(error, 'problem', None) or first_line(error), 200)}{at}"


def parse_yaml(text: str):
    """``text`` as YAML, as the safe loader reads it, aliases refused."""
    return yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader subclass


# --- messages ----------------------------------------------------------------------

def _range(constraints: dict) -> str:
    low = f"[{constraints['ge']:g}" if "ge" in constraints else f"({constraints['gt']:g}" if "gt" in constraints else ""
    high = f"{constraints['le']:g}]" if "le" in constraints else f"{constraints['lt']:g})" if "lt" in constraints else ""
    if low and high:
        return f"in {low}, {high}"
    if low:
        return (">= " if low[0] == "[" else "> ") + low[1:]
    return ("<= " if high[-1] == "]" else "< ") + high[:-1]


def _constraints(annotation) -> dict:
    found = {}
    for item in getattr(annotation, "__metadata__", ()):
        for meta in getattr(item, "metadata", [item]):
            for name in ("ge", "gt", "le", "lt"):
                if getattr(meta, name, None) is not None:
                    found[name] = getattr(meta, name)
        if hasattr(item, "__metadata__"):
            found.update(_constraints(item))
    origin = get_args(annotation)
    if origin and hasattr(origin[0], "__metadata__"):
        found.update(_constraints(origin[0]))
    return found


def _base(annotation):
    while hasattr(annotation, "__metadata__"):
        annotation = get_args(annotation)[0]
    return annotation


def _field(schema: type[BaseModel] | Any, loc: tuple):
    """The annotation of the field at ``loc`` in ``schema``, or None."""
    node = schema
    annotation = None
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return annotation
        info = fields[part]
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        node = info.annotation
    return annotation


def _message(schema, prefix: str, error: dict) -> str:
    loc = tuple(str(part) for part in error["loc"])
    dotted = ".".join(filter(None, [prefix, *loc]))
    value, kind = error.get("input"), error["type"]
    said = shown(repr(value))
    if kind == "missing":
        return f"params.yaml has no '{dotted}'; add it (see the README's params table)"
    if kind == "extra_forbidden":
        return f"params.yaml: {dotted} is not a known param; remove it or check its spelling"
    if kind in ("literal_error", "enum"):
        return f"params.yaml: {dotted} is {said}; expected one of {error['ctx']['expected'].replace(chr(39), '')}"
    if kind.startswith(("greater", "less")):
        annotation = _field(schema, tuple(error["loc"])) if error["loc"] else schema
        constraints = _constraints(annotation) or error.get("ctx", {})
        whole = _base(annotation) is int
        return f"params.yaml: {dotted} is {said}; expected {'a whole number' if whole else 'a number'} {_range(constraints)}"
    if kind == "value_error":
        return f"params.yaml: {error['msg'].removeprefix('Value error, ')}"
    if kind == "string_pattern_mismatch":
        return (f"params.yaml: {dotted} is {said}; use letters, digits, '_', '-' and '.', starting with a "
                f"letter or digit")
    if kind == "too_short":
        return f"params.yaml: {dotted} is {said}; expected a non-empty list"
    names = {"int": "a whole number", "float": "a number", "string": "text", "bool": "true or false",
             "model": "a mapping", "dict": "a mapping", "list": "a list"}
    wanted = next((text for key, text in names.items() if kind.startswith(key)), error["msg"].lower())
    return f"params.yaml: {dotted} is {said} ({type(value).__name__}); expected {wanted}"


def check(schema, value: Any, prefix: str = "") -> Any:
    """``value`` checked against ``schema`` (a group or a field's type), as plain data."""
    checked = typed(schema, value, prefix)
    return checked.model_dump() if isinstance(checked, BaseModel) else checked


def schema_at(dotted: str):
    """The type of the param at ``dotted`` (``train``, ``models.resnet18``, ``balance.seed``)."""
    node: Any = Params
    for part in dotted.split("."):
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            raise PipelineError(f"'{dotted}' is not a param this pipeline knows")
        info = fields[part]
        node = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return node


def check_all(values: dict) -> dict:
    """The whole params.yaml, checked."""
    return check(Params, values)


# --- what a stage declares -------------------------------------------------------------

class Declared:
    """The params a stage declares, typed: ``params.train`` is a :class:`Train`,
    ``params.model`` the architecture's name, ``params.architecture`` its
    ``models.<name>`` settings. Reading a group the stage does not declare raises,
    naming the stage; there is no reading by string key."""

    def __init__(self, stage: str, values: dict[str, Any], path: str = ""):
        self._stage, self._values, self._path = stage, values, path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._values:
            dotted = f"{self._path}.{name}" if self._path else name
            raise PipelineError(f"stage '{self._stage}' read param '{dotted}', which dvc.yaml does not declare "
                                f"for it; add it to the stage's params in dvc.yaml")
        return self._values[name]

    @property
    def architecture(self) -> Group:
        """The chosen architecture's settings (``models.${model}``)."""
        return getattr(self.models, self.model)

    def as_dict(self) -> dict:
        """What was declared, as plain data (for printing and comparing)."""
        def plain(value):
            if isinstance(value, Declared):
                return value.as_dict()
            return value.model_dump() if isinstance(value, BaseModel) else value
        return {key: plain(value) for key, value in self._values.items()}


def _declared_keys(stage: str, dvc_yaml: Path) -> list[str]:
    try:
        spec = parse_yaml(dvc_yaml.read_text(encoding="utf-8"))
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
            found = _lookup(values, match.group(1))
        except KeyError:
            raise PipelineError(f"dvc.yaml names ${{{match.group(1)}}}, which params.yaml does not have") from None
        if match.group(1) == "model":
            found = check(schema_at("model"), found, "model")
        return str(found)

    return re.sub(r"\$\{([\w.]+)\}", value, key)


def read_mapping(path: Path, missing: str, holding: str) -> dict:
    """The YAML mapping in ``path`` (aliases refused), or a one-line error: ``missing``
    when there is no file, ``holding`` naming what the mapping should hold otherwise."""
    try:
        values = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PipelineError(missing) from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{path} is not valid YAML: {yaml_problem(error)}; fix it") from None
    if not isinstance(values, dict):
        raise PipelineError(f"{path} must be a mapping {holding}")
    return values


def read_yaml(path: Path) -> dict:
    values = read_mapping(path, f"{path} not found; run stages from the project root", "of param groups")
    unknown = [key for key in values if key not in Params.model_fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(Params.model_fields), n=1)
        raise PipelineError(f"{path}: '{shown(unknown[0])}' is not a param group of this pipeline"
                            + (f" (did you mean '{close[0]}'?)" if close else "")
                            + f"; the groups are {', '.join(Params.model_fields)}")
    return values


def read_group(name: str, root: str | Path = ".") -> Any:
    """The typed group ``name`` of ``root``'s params.yaml (for code outside the stages)."""
    path = Path(root) / "params.yaml"
    values = read_yaml(path)
    if name not in values:
        raise PipelineError(f"{path} has no '{name}'; add it (see the README's params table)")
    return typed(schema_at(name), values[name], name)


def set_values(project: Path, overrides: dict) -> None:
    """Set dotted keys (``{"balance.seed": 3}``) in ``project``'s params.yaml, as
    ``dvc exp run -S`` would (used by the tests and the benchmark)."""
    path = Path(project) / "params.yaml"
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        node = values
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def typed(schema, value: Any, prefix: str = "") -> Any:
    """``value`` checked against ``schema``, as the typed group (or value) itself."""
    try:
        return TypeAdapter(schema).validate_python(value)
    except ValidationError as error:
        raise PipelineError(_message(schema, prefix, error.errors()[0])) from None


def load(stage: str, root: str | Path = ".") -> Declared:
    """The params ``stage`` declares, checked and typed, dotted keys nested as in params.yaml."""
    root = Path(root)
    values = read_yaml(root / "params.yaml")
    declared: dict[str, Any] = {}
    for key in _declared_keys(stage, root / "dvc.yaml"):
        key = _interpolate(key, values)
        try:
            node = _lookup(values, key)
        except KeyError:
            raise PipelineError(f"params.yaml has no '{key}', which stage '{stage}' declares") from None
        parts = key.split(".")
        target = declared
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = typed(schema_at(key), node, key)

    def wrap(values: dict, path: str) -> Declared:
        # a plain dict here is a group declared in part (``balance.seed``); the leaves are typed
        return Declared(stage, {key: wrap(value, f"{path}.{key}".lstrip(".")) if type(value) is dict else value
                                for key, value in values.items()}, path)

    return wrap(declared, "")

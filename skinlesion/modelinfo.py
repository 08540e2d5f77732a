"""The description a model file carries (everything but its weights), checked when it is
loaded, as params are: a model file or an ONNX export from elsewhere is input like any
other, and a field that would give empty probabilities (a zero std, a zero temperature),
exhaust memory (an image size of 60,000) or a traceback (text where a number belongs) is
refused in one line naming the field. No PyTorch here: the ONNX path uses it too."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, TypeAdapter, ValidationError, field_validator, model_validator

from skinlesion import PipelineError
from skinlesion.params import ARCHITECTURES, TTA, Head, Models
from skinlesion.untrusted import shown

Name = Annotated[str, Field(min_length=1, max_length=64)]


def _distinct(values: list, what: str) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"lists {what} twice")
    return values


class _ByName:
    """Read by attribute (``info.scoring is None``), never by key: ``"scoring" in info``
    would otherwise iterate pydantic's (name, value) pairs and be False, silently."""

    def __contains__(self, key):
        raise TypeError(f"a model description is read by attribute (.{key}), not with `in`")


class _Strict(_ByName, BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def dump(self) -> dict:
        """The fields as the file holds them (plain data; fields it does not hold left out)."""
        return self.model_dump(exclude_unset=True)


class Scoring(_Strict):
    tta: Literal[TTA] = "none"
    tau: FiniteFloat = 0.0
    log_prior: list[FiniteFloat] | None = None
    temperature: Annotated[FiniteFloat, Field(gt=0, le=1000)] = 1.0
    mel_threshold: Annotated[FiniteFloat, Field(ge=0, le=1)] | None = None
    # how the PyTorch path scores it (skinlesion.evaluation.inference.scoring_dtype); ONNX: float32
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    recheck: Annotated[FiniteFloat, Field(gt=0, lt=1)] = 0.02
    # the calibration chosen on validation (temperature: ``temperature`` applies; none: it is 1); None: not recorded
    method: Literal["none", "temperature"] | None = None


class Scope(_Strict):
    """The out-of-scope score (skinlesion.evaluation.scope) and its validation threshold."""
    method: Literal["msp", "energy", "mahalanobis"]
    threshold: FiniteFloat
    retention: Annotated[FiniteFloat, Field(gt=0, lt=1)]
    # the pooled features mahalanobis measures (skinlesion.training.models.pool_stages); files
    # written before it was recorded measured the last stage's alone
    features: Literal["last", "stages"] = "last"


class Patient(_Strict):
    age_scale: Annotated[FiniteFloat, Field(gt=0)]
    sex: Annotated[list[Name], Field(max_length=16)]
    localization: Annotated[list[Name], Field(max_length=64)]

    _values_distinct = field_validator("sex", "localization")(lambda values: _distinct(values, "a value"))


Channel = Annotated[FiniteFloat, Field(ge=-10, le=10)]
Spread = Annotated[FiniteFloat, Field(gt=0, le=10)]


ENSEMBLE = "ensemble"  # the architecture of a file that carries several members
COMBINE = ("probabilities", "logits")
MAX_MEMBERS = 32


def _check_settings(architecture: str, settings: dict) -> None:
    known = Models.model_fields[architecture].annotation.model_fields
    for key, value in settings.items():
        if key == "head" or key not in known:
            raise ValueError(f"settings.{key} is not a setting of {architecture}")
        annotation = known[key].annotation
        metadata = known[key].metadata
        try:
            TypeAdapter(Annotated[(annotation, *metadata)] if metadata else annotation).validate_python(
                value, strict=True)
        except ValidationError as error:
            raise ValueError(f"settings.{key} is {shown(repr(value))} ({error.errors()[0]['msg'].lower()})") from None


class Member(_ByName, BaseModel):
    """One network of an ensemble file."""

    model_config = ConfigDict(extra="allow", strict=True)
    architecture: Literal[ARCHITECTURES]
    settings: dict[str, Any] = {}
    head: Head | None = None
    training: dict[str, Any] = {}  # informative only: how it was trained

    @model_validator(mode="after")
    def _consistent(self):
        _check_settings(self.architecture, self.settings)
        return self


class ModelInfo(_ByName, BaseModel):
    """A model file's description; the ONNX export carries the same fields. An
    ensemble's ``architecture`` is ``ensemble``, its ``settings`` ``{combine: ...}``,
    and ``members`` describes each network."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: str | None = None  # informative only, as ``training``
    architecture: Literal[(*ARCHITECTURES, ENSEMBLE)]
    members: Annotated[list[Member], Field(min_length=2, max_length=MAX_MEMBERS)] | None = None
    settings: dict[str, Any] = {}
    head: Head | None = None
    classes: Annotated[list[Name], Field(min_length=2, max_length=1000)]
    image_size: Annotated[int, Field(ge=16, le=1024)]  # the prepare stage's own range
    mean: Annotated[list[Channel], Field(min_length=3, max_length=3)]
    std: Annotated[list[Spread], Field(min_length=3, max_length=3)]
    scoring: Scoring | None = None
    scope: Scope | None = None
    patient: Patient | None = None
    training: dict[str, Any] = {}

    _classes_distinct = field_validator("classes")(lambda values: _distinct(values, "a class"))

    @model_validator(mode="after")
    def _consistent(self):
        if self.architecture == ENSEMBLE:
            if self.members is None:
                raise ValueError("an ensemble file lists no members")
            if set(self.settings) != {"combine"} or self.settings["combine"] not in COMBINE:
                raise ValueError(f"an ensemble's settings are {{combine: {' | '.join(COMBINE)}}}, not "
                                 f"{shown(repr(self.settings))}")
        elif self.members is not None:
            raise ValueError(f"a {self.architecture} file has no members (only an ensemble has)")
        else:
            _check_settings(self.architecture, self.settings)
        prior = self.scoring.log_prior if self.scoring else None
        if prior is not None and len(prior) != len(self.classes):
            raise ValueError(f"scoring.log_prior has {len(prior)} values for {len(self.classes)} classes")
        return self


    def dump(self) -> dict:
        """The fields as the file holds them (plain data; fields it does not hold left out)."""
        return self.model_dump(exclude_unset=True)

    def replace(self, **fields) -> ModelInfo:
        """A copy with ``fields`` set (``scoring={...}``, say), checked again."""
        return ModelInfo.model_validate({**self.dump(), **fields})

    @property
    def is_ensemble(self) -> bool:
        return self.members is not None

    @property
    def networks(self) -> list[Member | ModelInfo]:
        """The description of each network: an ensemble's members, or the model itself."""
        return list(self.members) if self.members is not None else [self]


def check(info: dict, where: str, hint: str) -> ModelInfo:
    """``info`` (a model file's fields, less the weights) as a ``ModelInfo`` if every field
    is what it must be; else a PipelineError naming ``where`` and the field."""
    try:
        return ModelInfo.model_validate(info)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        value = f" is {shown(repr(first['input']))}" if field and first["type"] != "missing" else ""
        about = f"{field}{value}: " if field else ""
        raise PipelineError(f"{where}: {about}{message[0].lower() + message[1:]} (the file is damaged or was "
                            f"edited); {hint}") from None


def described(info: ModelInfo | dict) -> ModelInfo:
    """``info`` as a ``ModelInfo``: itself, or a description given as plain data, checked."""
    if isinstance(info, ModelInfo):
        return info
    return check(dict(info), "the model description", "describe the model as a model file does")

"""A saved model carries everything needed to use it: architecture and settings,
class names in order, input size, normalisation. Loading never unpickles code
(``weights_only=True``), so a model file from someone else cannot run anything."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from skinlesion import PipelineError, modelinfo
from skinlesion.data import patient
from skinlesion.files import write_bytes
from skinlesion.training import models
from skinlesion.untrusted import first_line

FORMAT = "skinlesion-model/1"


def save(path: str | Path, model: models.Classifier, *, architecture: str, settings: dict, head: dict,
         classes, image_size: int, mean, std, training: dict, patient: dict | None = None) -> None:
    """``patient``: the metadata encoding (skinlesion.data.patient) of a model that takes it."""
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "architecture": architecture, "settings": dict(settings), "head": dict(head),
               "classes": list(classes), "image_size": int(image_size), "mean": list(mean), "std": list(std),
               "training": dict(training), "state_dict": state}
    if patient is not None:  # absent, not None, otherwise: files of models without it keep their bytes
        payload["patient"] = dict(patient)
    _write(path, payload)


def _fresh(value):
    """``value`` rebuilt with a new object for every string: pickle shares one copy of
    an object met twice, so two equal payloads built from differently shared strings
    (params read by YAML or by the typed params layer) would differ in their bytes."""
    if isinstance(value, dict):
        return {_fresh(key): _fresh(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fresh(item) for item in value]
    if isinstance(value, str) and len(value) > 1:
        return value.encode("utf-8").decode("utf-8")
    return value


def _write(path: str | Path, payload: dict) -> None:
    # Through a buffer: saved to a path, torch names the archive's inner folder after
    # the (random) temporary file, and identical models would differ in their bytes.
    buffer = io.BytesIO()
    torch.save({**_fresh({k: v for k, v in payload.items() if k != "state_dict"}), "state_dict": payload["state_dict"]},
               buffer)
    write_bytes(path, buffer.getvalue())


def with_scoring(source: str | Path, target: str | Path, scoring: dict, scope: dict | None = None,
                 scope_state: dict | None = None) -> None:
    """Copy the model file ``source`` to ``target`` with its ``scoring`` (how it is
    meant to be applied: TTA, logit adjustment, temperature, thresholds) set, and its
    out-of-scope ``scope`` (method, threshold) with the tensors that method needs
    (``scope_state``: ``scope.means`` and ``scope.whitening`` for mahalanobis)."""
    payload, _ = _read(Path(source))
    payload["scoring"] = dict(scoring)
    _set_scope(payload, scope, scope_state)
    _write(target, payload)


def _set_scope(payload: dict, scope: dict | None, scope_state: dict | None) -> None:
    if scope is None:
        return
    payload["scope"] = dict(scope)
    payload["state_dict"] = {**payload["state_dict"],
                             **{key: value.detach().to("cpu").clone() for key, value in (scope_state or {}).items()}}


SHARED = ("classes", "image_size", "mean", "std", "patient")  # what every member of an ensemble must agree on


def save_ensemble(members: list[str | Path], target: str | Path, combine: str, scoring: dict,
                  scope: dict | None = None, scope_state: dict | None = None) -> None:
    """One model file for the networks of the model files ``members`` with ``scoring``:
    for one member, that member's file with its scoring set (what ``with_scoring``
    writes); for several, an ``ensemble`` file whose state dict holds each member's
    weights under ``members.<i>.``, as ``models.Ensemble`` names them."""
    if len(members) == 1:
        with_scoring(members[0], target, scoring, scope, scope_state)
        return
    payloads = [_read(Path(member))[0] for member in members]
    _agree(members, payloads)
    first = payloads[0]
    state = {f"members.{index}.{key}": value for index, payload in enumerate(payloads)
             for key, value in payload["state_dict"].items()}
    payload = {"format": FORMAT, "architecture": modelinfo.ENSEMBLE, "settings": {"combine": combine}, "head": None,
               **{key: first[key] for key in SHARED if key in first},
               "members": [{key: payload[key] for key in ("architecture", "settings", "head", "training")}
                           for payload in payloads],
               "training": {"members": len(payloads)}, "scoring": dict(scoring), "state_dict": state}
    _set_scope(payload, scope, scope_state)
    _write(target, payload)


def _agree(members: list, descriptions: list[dict]) -> None:
    first = descriptions[0]
    for member, description in zip(members[1:], descriptions[1:]):
        for key in SHARED:
            if description.get(key) != first.get(key):
                raise PipelineError(f"{member} and {members[0]} differ in their {key}; the members of an ensemble "
                                    f"must be trained on the same data (rerun their train stages)")


def load_members(members: list[str | Path], combine: str, device: str | torch.device = "cpu"):
    """The model files ``members`` as one model (a ``models.Ensemble`` for several, the
    one network for one) and the description they share (the first member's)."""
    loaded = [load(member, device) for member in members]
    _agree(members, [info.dump() for _, info in loaded])
    if len(loaded) == 1:
        return loaded[0]
    return models.Ensemble([model for model, _ in loaded], combine).eval(), loaded[0][1]


HINT = "give a model file written by the train or calibrate stage (models/model.pt)"
REQUIRED = ("architecture", "settings", "head", "classes", "image_size", "mean", "std", "state_dict")


def _read(path: Path) -> tuple[dict, modelinfo.ModelInfo]:
    """The file's payload and its checked description."""
    try:
        if path.stat().st_size == 0:
            raise PipelineError(f"{path} is empty (0 bytes), not a model file (an interrupted copy?); copy it "
                                f"again or {HINT}")
        with open(path, "rb") as handle:
            if not zipfile.is_zipfile(handle):  # what torch.save writes
                raise PipelineError(f"{path}: not a model file (not a PyTorch archive); {HINT}")
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such model file; run `dvc repro train` first") from None
    except IsADirectoryError:
        raise PipelineError(f"{path} is a folder, not a model file; {HINT}") from None
    except PermissionError:
        raise PipelineError(f"{path}: cannot read the model file (permission denied); give this user read "
                            f"access to it") from None
    except PipelineError:
        raise
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False: the unsafe load this refusal prevents.
        raise PipelineError(f"{path}: not a loadable model file (it holds objects other than weights, which "
                            f"are never loaded: they could run code); {HINT}") from None
    except Exception as error:  # noqa: BLE001 - corrupt files of every kind
        raise PipelineError(f"{path}: not a loadable model file ({first_line(error)}); {HINT}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a {FORMAT} file; {HINT}")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise PipelineError(f"{path}: a {FORMAT} file without {', '.join(missing)} (damaged, or written by "
                            f"another version); {HINT}")
    info = modelinfo.check(_description(payload), str(path), HINT)
    if not isinstance(payload["state_dict"], dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in payload["state_dict"].items()):
        raise PipelineError(f"{path}: its state_dict is not a mapping of names to tensors (the file is damaged or "
                            f"was edited); {HINT}")
    return payload, info


def _description(payload: dict) -> dict:
    return {key: value for key, value in payload.items() if key != "state_dict"}


def _build(info: modelinfo.ModelInfo, state: dict, path) -> torch.nn.Module:
    def network(description) -> models.Classifier:
        if description.head is None:
            raise PipelineError(f"{path}: it describes no head for its {description.architecture} network (the file "
                                f"is damaged or was edited); {HINT}")
        return models.build(description.architecture, num_classes=len(info.classes), image_size=info.image_size,
                            settings=description.settings, head=description.head.model_dump(),
                            patient_width=patient.width(info.patient.model_dump()) if info.patient else 0)

    if info.is_ensemble:
        model = models.Ensemble([network(member) for member in info.members], info.settings["combine"])
    else:
        model = network(info)
    if info.scope is not None and info.scope.method == "mahalanobis":
        if "scope.means" not in state or "scope.whitening" not in state:
            raise PipelineError(f"{path}: its out-of-scope score has no class means or whitening (the file is damaged or was "
                                f"edited); {HINT}")
        model.scope = models.Scope(torch.empty(state["scope.means"].shape), torch.empty(state["scope.whitening"].shape))
        models.pool_stages(model, info.scope.features)
    return model


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, modelinfo.ModelInfo]:
    """The model (in eval mode, on ``device``; a ``models.Ensemble`` for an ensemble
    file) and its description."""
    payload, info = _read(Path(path))
    # Built on the meta device, the architecture costs no memory until the file's own
    # tensors are put in its place: settings that describe a huge network cannot
    # exhaust memory beyond the size of the file itself.
    with torch.device("meta"):
        model = _build(info, payload["state_dict"], path)
    try:
        model.load_state_dict(payload["state_dict"], assign=True)
    except (RuntimeError, TypeError, AttributeError, ValueError) as error:
        raise PipelineError(f"{path}: its weights do not fit its {info.architecture} architecture "
                            f"({first_line(error)}); the file is damaged or was edited; {HINT}") from None
    if any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()]):
        raise PipelineError(f"{path}: its weights leave part of its {info.architecture} architecture unset; "
                            f"the file is damaged or was edited; {HINT}")
    if not all(torch.isfinite(tensor).all() for tensor in model.state_dict().values() if tensor.is_floating_point()):
        raise PipelineError(f"{path}: its weights hold NaN or infinite values (a training run that diverged?); "
                            f"{HINT}")
    return models.channels_last(model.to(device)).eval(), info

"""A saved model carries everything needed to use it: architecture and settings,
class names in order, input size, normalisation. Loading never unpickles code
(``weights_only=True``), so a model file from someone else cannot run anything."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from skinlesion import PipelineError
from skinlesion.files import write_bytes
from skinlesion.training import models

FORMAT = "skinlesion-model/1"


def save(path: str | Path, model: models.Classifier, *, architecture: str, settings: dict, head: dict,
         classes, image_size: int, mean, std, training: dict) -> None:
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "architecture": architecture, "settings": dict(settings), "head": dict(head),
               "classes": list(classes), "image_size": int(image_size), "mean": list(mean), "std": list(std),
               "training": dict(training), "state_dict": state}
    _write(path, payload)


def _write(path: str | Path, payload: dict) -> None:
    # Through a buffer: saved to a path, torch names the archive's inner folder after
    # the (random) temporary file, and identical models would differ in their bytes.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getvalue())


def with_scoring(source: str | Path, target: str | Path, scoring: dict) -> None:
    """Copy the model file ``source`` to ``target`` with its ``scoring`` (how it is
    meant to be applied: TTA, logit adjustment, temperature, thresholds) set."""
    payload = _read(Path(source))
    payload["scoring"] = dict(scoring)
    _write(target, payload)


def _read(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such model file; run `dvc repro train` first") from None
    except Exception as error:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        raise PipelineError(f"{path}: not a loadable model file ({str(error).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a {FORMAT} file")
    return payload


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[models.Classifier, dict]:
    """The model (in eval mode, on ``device``) and its description."""
    payload = _read(Path(path))
    model = models.build(payload["architecture"], num_classes=len(payload["classes"]),
                         image_size=payload["image_size"], settings=payload["settings"], head=payload["head"])
    model.load_state_dict(payload["state_dict"])
    info = {key: value for key, value in payload.items() if key != "state_dict"}
    return models.channels_last(model.to(device)).eval(), info

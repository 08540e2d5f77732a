"""The calibrated model as one ONNX file that runs without PyTorch (stage export).

The graph takes what the pipeline decodes, uint8 RGB images N x S x S x 3 (NHWC; S
the model's image size, N free), normalises them inside, and returns raw logits
(N x classes). Scoring stays outside the graph, as in
``skinlesion.evaluation.inference``: the file's metadata carries the model file's
``scoring`` (TTA views, logit adjustment, temperature, melanoma threshold) and
``skinlesion.deployment.runtime`` applies it with the same code as the PyTorch path.

Metadata (``metadata_props``, all text): ``format``, ``architecture``, ``classes``
(JSON), ``image_size``, ``mean`` and ``std`` (JSON, per channel on the 0-1 scale),
``input``, ``output`` and, when the model file has one, ``scoring`` (JSON); for an
ensemble also ``settings`` (its combination) and ``members`` (JSON), its graph
combining the members' logits as ``models.Ensemble`` does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from skinlesion import PipelineError
from skinlesion.data import patient
from skinlesion.deployment import runtime
from skinlesion.deployment.runtime import FORMAT, INPUT, OUTPUT, PATIENT, SCOPE
from skinlesion.evaluation.inference import normalise
from skinlesion.files import atomic_path
from skinlesion.modelinfo import ModelInfo, described
from skinlesion.untrusted import first_line

OPSET = 18  # the opset torch's exporter (torch.onnx, dynamo=True) translates to natively
TOLERANCE = 1e-3  # largest |logit difference| from PyTorch accepted when the export checks itself


class Normalised(nn.Module):
    """uint8 N x S x S x 3 images in, the model's logits out: the arithmetic of
    ``inference.normalise`` inside the graph."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        # Not `mean`/`std`: unoptimised, the exporter names weights and node outputs (aten.mean's
        # among them) from one space, and a duplicate name makes an invalid model.
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.answer((images.permute(0, 3, 1, 2).float() - self.pixel_mean) / self.pixel_std)

    def answer(self, batch: torch.Tensor, *patient: torch.Tensor):
        """The logits; with the Mahalanobis out-of-scope score, (logits, distances)."""
        scope = getattr(self.model, "scope", None)
        if scope is None:
            return self.model(batch, *patient)
        logits, features = self.model.forward_features(batch, *patient)
        return logits, scope(features)


class NormalisedWithPatient(Normalised):
    """``Normalised`` for a model that also takes the encoded patient metadata."""

    def forward(self, images: torch.Tensor, patient: torch.Tensor) -> torch.Tensor:
        return self.answer((images.permute(0, 3, 1, 2).float() - self.pixel_mean) / self.pixel_std, patient)


def metadata(info: ModelInfo | dict) -> dict[str, str]:
    """The model file's description, as the ONNX file's metadata."""
    info = described(info)
    size = info.image_size
    props = {"format": FORMAT, "architecture": info.architecture, "classes": json.dumps(list(info.classes)),
             "image_size": str(size), "mean": json.dumps(list(info.mean)), "std": json.dumps(list(info.std)),
             "input": f"{INPUT}: uint8 RGB, N x {size} x {size} x 3 (NHWC), normalised inside the graph",
             "output": f"{OUTPUT}: float32 N x {len(info.classes)} raw logits, before the scoring"}
    if info.scoring is not None and info.scoring.dump():
        props["scoring"] = json.dumps(info.scoring.dump(), sort_keys=True)
    if info.scope is not None:
        props["scope"] = json.dumps(info.scope.dump(), sort_keys=True)
        if info.scope.method == "mahalanobis":
            props["output"] += f"; {SCOPE}: float32 N, the out-of-scope distance (compared with scope.threshold)"
    if info.is_ensemble:  # an ensemble: its combination and members, the graph averaging them inside
        props["settings"] = json.dumps(info.settings, sort_keys=True)
        props["members"] = json.dumps([{"architecture": member.architecture, "settings": member.settings,
                                        "head": None if member.head is None else member.head.model_dump()}
                                       for member in info.members], sort_keys=True)
        props["output"] += f" (the {len(info.members)} members combined by their {info.settings['combine']})"
    if info.patient is not None:
        props["patient"] = json.dumps(info.patient.dump(), sort_keys=True)
        props["input"] += f"; {PATIENT}: float32 N x {patient.width(info.patient.dump())}, the encoded metadata"
    return props


def _example(size: int, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)


def _example_patient(info: ModelInfo, batch: int) -> tuple[torch.Tensor, ...]:
    """Encoded metadata rows for a model that takes them (ages spread, sites cycled), else ()."""
    if info.patient is None:
        return ()
    import pandas as pd

    spec = info.patient
    frame = pd.DataFrame({"age": [str(20 + 15 * i) for i in range(batch)],
                          "sex": [spec.sex[i % len(spec.sex)] for i in range(batch)],
                          "localization": [spec.localization[i % len(spec.localization)] for i in range(batch)]})
    return (torch.from_numpy(patient.encode(frame, spec.dump())),)


def to_onnx(model: nn.Module, info: ModelInfo | dict, example_batch: int = 2) -> onnx.ModelProto:
    """The model (in eval mode) with its metadata as an ONNX model whose batch axis is free."""
    info = described(info)
    wrapper = (NormalisedWithPatient if info.patient is not None else Normalised)(model, info.mean, info.std).eval()
    example = (_example(info.image_size, example_batch), *_example_patient(info, example_batch))
    name = info.architecture
    batch = torch.export.Dim("batch", min=1)
    shapes = {"images": {0: batch}, **({"patient": {0: batch}} if len(example) > 1 else {})}
    names = [INPUT, PATIENT][:len(example)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            # Strict (TorchDynamo) tracing keeps `len(tensor)` symbolic; the default non-strict
            # trace turns it into the example's batch size (the ResNet-Transformer's class token).
            program = torch.export.export(wrapper, example, strict=True, dynamic_shapes=shapes)
            # optimize=False: ONNX Script's optimiser (0.7) drops an Add of any constant within
            # 1e-8 of zero, which removes FixCaps' squash epsilon and moves its logits by ~1e-3.
            outputs = [OUTPUT, SCOPE] if getattr(model, "scope", None) is not None else [OUTPUT]
            exported = torch.onnx.export(program, example, input_names=names, output_names=outputs,
                                         opset_version=OPSET, dynamo=True, external_data=False, optimize=False,
                                         verbose=False)
    except Exception as error:  # noqa: BLE001 - whatever the exporter refuses is reported on one line
        reason = first_line(error)
        raise PipelineError(f"{name} cannot be exported to ONNX ({type(error).__name__}: {reason})") from None
    proto = exported.model_proto
    proto.doc_string = f"skinlesion {name}: uint8 NHWC images in, logits out; see metadata_props"
    for key, value in metadata(info).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto


def largest_difference(proto_or_path, model: nn.Module, info: ModelInfo | dict, batch: int = 3) -> float:
    """Largest |logit| difference between ONNX Runtime and PyTorch on ``batch`` random
    images (a batch size other than the example's, so the free batch axis is exercised)."""
    info = described(info)
    session, _ = runtime.load(proto_or_path)
    images = _example(info.image_size, batch).numpy()
    extra = _example_patient(info, batch)
    feed = {INPUT: images, **({PATIENT: extra[0].numpy()} if extra else {})}
    got = session.run([OUTPUT], feed)[0]
    with torch.no_grad():
        expected = model.eval()(normalise(images, info, "cpu"), *extra).float().numpy()
    difference = float(np.abs(got - expected).max())
    if getattr(model, "scope", None) is not None:  # the distance, relative to its size
        with torch.no_grad():
            _, features = model.forward_features(normalise(images, info, "cpu"), *extra)
            distances = model.scope(features).numpy()
        onnx_distances = session.run([SCOPE], feed)[0]
        difference = max(difference, float((np.abs(onnx_distances - distances) / np.maximum(distances, 1.0)).max()))
    return difference


def export(model: nn.Module, info: ModelInfo | dict, path: str | Path) -> float:
    """Write the ONNX file to ``path`` after checking it against PyTorch; returns the
    largest logit difference seen. Nothing is written if the check fails."""
    info = described(info)
    proto = to_onnx(model, info)
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        difference = largest_difference(tmp, model, info)
        if not difference <= TOLERANCE:
            raise PipelineError(f"the ONNX export of {info.architecture} differs from PyTorch by {difference:.2g} "
                                f"in the logits (more than {TOLERANCE}); keep using {Path(path).with_suffix('.pt')}")
    return difference

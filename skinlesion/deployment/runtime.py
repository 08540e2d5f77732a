"""The ONNX export on ONNX Runtime, scored like the model file it came from.

``load`` gives a session and the same description ``skinlesion.modelfile.load``
gives (classes, image size, normalisation, scoring); ``OnnxPredictor`` is the ONNX
backend of the one scoring path (skinlesion.evaluation.predictor): the same test-time
views and the same scoring, so an image gets the same probabilities here as from
``models/model.pt``. No PyTorch is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime

from skinlesion import PipelineError, modelinfo
from skinlesion.evaluation.predictor import Predictor, check_views, view_count
from skinlesion.progress import bar
from skinlesion.untrusted import first_line, shown

FORMAT = "skinlesion-onnx/1"  # what skinlesion.deployment.export writes
INPUT, OUTPUT = "images", "logits"
PATIENT = "patient"  # the second input of a model that takes the patient's metadata
SCOPE = "scope"  # the second output of a model carrying the Mahalanobis out-of-scope score


def load(source, threads: int = 0) -> tuple[onnxruntime.InferenceSession, modelinfo.ModelInfo]:
    """A session on the CPU for the ONNX file (a path, or a ModelProto) and its
    description; ``threads`` 0 lets ONNX Runtime choose."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # its warnings about unused initialisers say nothing to a user
    model = source.SerializeToString() if hasattr(source, "SerializeToString") else str(source)
    if isinstance(model, str) and not Path(model).is_file():
        raise PipelineError(f"{model}: no such ONNX file; run `dvc repro export` first")
    try:
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ONNX Runtime's own error types for corrupt and foreign files
        reason = first_line(error)
        raise PipelineError(f"{source if isinstance(model, str) else 'the model'}: not a loadable ONNX file "
                            f"({reason})") from None
    props = session.get_modelmeta().custom_metadata_map
    where = str(source) if isinstance(model, str) else "the model"
    if props.get("format") != FORMAT:
        raise PipelineError(f"{where}: not a {FORMAT} file; write one with `dvc repro export`")
    hint = "export it again with `dvc repro export`"
    info = {"architecture": props.get("architecture")}
    missing = [key for key in ("classes", "image_size", "mean", "std") if key not in props]
    if missing:
        raise PipelineError(f"{where}: its metadata has no {missing[0]} (the file is damaged or was edited); {hint}")
    for key in ("classes", "image_size", "mean", "std", "scoring", "patient", "settings", "members", "scope"):
        if key not in props:  # scoring and patient are optional; settings and members an ensemble's
            continue
        try:
            info[key] = json.loads(props[key])
        except ValueError:
            raise PipelineError(f"{where}: its metadata field {key} is not JSON ({shown(props[key])!r}; the file is "
                                f"damaged or was edited); {hint}") from None
    return session, modelinfo.check(info, where, hint)


def _views(batch: np.ndarray, tta: str) -> list[np.ndarray]:
    """``inference._views`` on NHWC: width is axis 2, height axis 1."""
    if tta == "none":
        return [batch]
    views = [batch, batch[:, :, ::-1], batch[:, ::-1], batch[:, ::-1, ::-1]]
    if tta == "dihedral":
        views += [view.transpose(0, 2, 1, 3) for view in views]
    return [np.ascontiguousarray(view) for view in views]


def view_logits(session: onnxruntime.InferenceSession, info: modelinfo.ModelInfo, images: np.ndarray, *, tta: str,
                batch_size: int = 128, progress: str | None = None, patient: np.ndarray | None = None) -> np.ndarray:
    """V x N x classes raw logits, one slice per test-time view of ``tta``; ``patient``:
    the encoded metadata rows, for a model that takes them."""
    if (info.patient is not None) != (patient is not None):
        raise PipelineError("this model takes the patient's metadata (age, sex, site) beside the image; none was "
                            "given" if info.patient is not None else "this model takes no patient metadata")
    check_views(tta, images, info)
    out = [np.zeros((view_count(tta), 0, len(info.classes)), np.float32)]
    starts = range(0, len(images), batch_size)
    for start in starts if progress is None else bar(starts, desc=progress, unit="batch"):
        batch = np.asarray(images[start:start + batch_size], dtype=np.uint8)
        extra = {} if patient is None else {PATIENT: np.asarray(patient[start:start + batch_size], np.float32)}
        out.append(np.stack([session.run([OUTPUT], {INPUT: view, **extra})[0] for view in _views(batch, tta)]))
    return np.concatenate(out, axis=1)


def view_outputs(session: onnxruntime.InferenceSession, info: modelinfo.ModelInfo, images: np.ndarray, *, tta: str,
                 batch_size: int = 128, progress: str | None = None, patient: np.ndarray | None = None):
    """``view_logits`` and, for a graph with the out-of-scope output, the plain view's
    distances from the same runs; else None."""
    if SCOPE not in [output.name for output in session.get_outputs()]:
        return view_logits(session, info, images, tta=tta, batch_size=batch_size, progress=progress,
                           patient=patient), None
    if (info.patient is not None) != (patient is not None):
        raise PipelineError("this model takes the patient's metadata (age, sex, site) beside the image; none was "
                            "given" if info.patient is not None else "this model takes no patient metadata")
    check_views(tta, images, info)
    out, distances = [np.zeros((view_count(tta), 0, len(info.classes)), np.float32)], [np.zeros(0, np.float32)]
    starts = range(0, len(images), batch_size)
    for start in starts if progress is None else bar(starts, desc=progress, unit="batch"):
        batch = np.asarray(images[start:start + batch_size], dtype=np.uint8)
        extra = {} if patient is None else {PATIENT: np.asarray(patient[start:start + batch_size], np.float32)}
        plain, *others = _views(batch, tta)
        first, distance = session.run([OUTPUT, SCOPE], {INPUT: plain, **extra})
        out.append(np.stack([first] + [session.run([OUTPUT], {INPUT: view, **extra})[0] for view in others]))
        distances.append(distance)
    return np.concatenate(out, axis=1), np.concatenate(distances)


def plain_outputs(session: onnxruntime.InferenceSession, info: modelinfo.ModelInfo, images: np.ndarray, *, batch_size: int = 128,
                  patient: np.ndarray | None = None, progress: str | None = None):
    """The plain view's logits and, for a graph with the out-of-scope output, the distances."""
    check_views("none", images, info)
    has_scope = SCOPE in [output.name for output in session.get_outputs()]
    names = [OUTPUT, SCOPE] if has_scope else [OUTPUT]
    logits, distances = [np.zeros((0, len(info.classes)), np.float32)], [np.zeros(0, np.float32)]
    starts = range(0, len(images), batch_size)
    for start in starts if progress is None else bar(starts, desc=progress, unit="batch"):
        feed = {INPUT: np.asarray(images[start:start + batch_size], dtype=np.uint8)}
        if patient is not None:
            feed[PATIENT] = np.asarray(patient[start:start + batch_size], np.float32)
        got = session.run(names, feed)
        logits.append(got[0])
        if has_scope:
            distances.append(got[1])
    return np.concatenate(logits), np.concatenate(distances) if has_scope else None


class OnnxPredictor(Predictor):
    """An ONNX export on ONNX Runtime (the CPU)."""

    def __init__(self, session: onnxruntime.InferenceSession, info: modelinfo.ModelInfo):
        super().__init__(info)
        self.session = session

    def view_logits(self, images: np.ndarray, *, tta: str, batch_size: int = 128, progress: str | None = None,
                    patient: np.ndarray | None = None) -> np.ndarray:
        return view_logits(self.session, self.info, images, tta=tta, batch_size=batch_size, progress=progress,
                           patient=patient)

    def view_outputs(self, images: np.ndarray, *, tta: str, batch_size: int = 128, progress: str | None = None,
                     patient: np.ndarray | None = None):
        return view_outputs(self.session, self.info, images, tta=tta, batch_size=batch_size, progress=progress,
                            patient=patient)

    def plain_outputs(self, images: np.ndarray, *, batch_size: int = 128, patient: np.ndarray | None = None,
                      progress: str | None = None):
        return plain_outputs(self.session, self.info, images, batch_size=batch_size, patient=patient,
                             progress=progress)

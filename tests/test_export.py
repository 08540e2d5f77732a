"""The ONNX export: every architecture gives PyTorch's logits on ONNX Runtime, for any
batch size; the file carries the model's description and scoring; the export stage
and the prediction command use it like models/model.pt."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from skinlesion import CLASSES, PipelineError, modelfile, params
from skinlesion.deployment import export, runtime
from skinlesion.evaluation import inference
from skinlesion.training import models
from tests.conftest import make_project, run

HEAD = {"hidden": 16, "dropout": 0.1}
SMALL = {"fixcaps": {"channels": 16, "kernel": 9, "primary_types": 4},
         "vit_b_16": {"layers": 2, "heads": 2, "hidden_dim": 32, "mlp_dim": 64}}
SCORING = {"tta": "dihedral", "tau": 0.5, "log_prior": np.log(np.arange(1, 8) / 28).tolist(), "temperature": 1.3,
           "mel_threshold": 0.2}


def small_model(name: str, scoring: dict | None = SCORING):
    torch.manual_seed(0)
    size = 64 if name == "fixcaps" else 32
    model = models.build(name, num_classes=len(CLASSES), image_size=size, settings=SMALL.get(name, {}), head=HEAD)
    info = {"architecture": name, "settings": SMALL.get(name, {}), "head": HEAD, "classes": list(CLASSES),
            "image_size": size, "mean": list(models.IMAGENET_MEAN), "std": list(models.IMAGENET_STD), "training": {}}
    if scoring is not None:
        info["scoring"] = scoring
    return models.channels_last(model).eval(), info


def images(count: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


# The export of the larger networks takes seconds each; simple_cnn stays in the quick run.
@pytest.mark.parametrize("name", [name if name == "simple_cnn" else pytest.param(name, marks=pytest.mark.slow)
                                  for name in params.ARCHITECTURES])
def test_onnx_runtime_matches_pytorch_with_a_free_batch_size(name):
    model, info = small_model(name)
    proto = export.to_onnx(model, info, example_batch=2)
    session, loaded = runtime.load(proto, threads=1)
    pixels = images(5, info["image_size"])  # exported with a batch of 2, run with 5
    onnx_logits = runtime.view_logits(session, loaded, pixels, tta="dihedral")
    torch_logits = inference.view_logits(model, info, pixels, tta="dihedral")
    assert onnx_logits.shape == torch_logits.shape == (8, 5, len(CLASSES))
    logit_difference = float(np.abs(onnx_logits - torch_logits).max())
    probability_difference = float(np.abs(runtime.OnnxPredictor(session, loaded).probabilities(pixels)
                                          - inference.TorchPredictor(model, info).probabilities(pixels)).max())
    print(f"{name}: largest difference from PyTorch {logit_difference:.2g} (logits), "
          f"{probability_difference:.2g} (scored probabilities)")
    assert logit_difference <= 1e-4 and probability_difference <= 1e-4
    one = runtime.view_logits(session, loaded, pixels[:1], tta="none")
    np.testing.assert_allclose(one[0], torch_logits[0, :1], atol=1e-4)


def test_the_file_carries_classes_size_normalisation_and_scoring(tmp_path):
    model, info = small_model("simple_cnn")
    difference = export.export(model, info, tmp_path / "model.onnx")
    assert difference <= 1e-5
    proto = onnx.load(tmp_path / "model.onnx")
    assert proto.opset_import[0].version == export.OPSET
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["logits"]
    batch_axis = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value  # named, not fixed
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["format"] == "skinlesion-onnx/1" and "NHWC" in props["input"] and "logits" in props["output"]
    _, loaded = runtime.load(tmp_path / "model.onnx")
    assert loaded.dump() == {key: info[key] for key in ("architecture", "classes", "image_size", "mean", "std", "scoring")}
    # identical inputs give identical bytes, so DVC sees an unchanged output
    export.export(model, info, tmp_path / "again.onnx")
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()


def test_a_model_without_scoring_is_scored_as_trained(tmp_path):
    model, info = small_model("simple_cnn", scoring=None)
    session, loaded = runtime.load(export.to_onnx(model, info), threads=1)
    on_onnx, on_torch = runtime.OnnxPredictor(session, loaded), inference.TorchPredictor(model, info)
    assert loaded.scoring is None and on_onnx.scoring == on_torch.scoring
    pixels = images(3, 32)
    np.testing.assert_allclose(on_onnx.probabilities(pixels), on_torch.probabilities(pixels), atol=1e-5)


def test_an_architecture_the_exporter_refuses_is_one_line(monkeypatch, tmp_path):
    model, info = small_model("simple_cnn")

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::capsule\nlong trace...")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(PipelineError) as raised:
        export.export(model, {**info, "architecture": "fixcaps"}, tmp_path / "model.onnx")
    assert str(raised.value) == ("fixcaps cannot be exported to ONNX "
                                 "(RuntimeError: unsupported operator aten::capsule)")
    assert not (tmp_path / "model.onnx").exists()


def test_an_export_that_disagrees_with_pytorch_is_not_kept(monkeypatch, tmp_path):
    model, info = small_model("simple_cnn")
    monkeypatch.setattr(export, "largest_difference", lambda *args, **kwargs: 0.5)
    with pytest.raises(PipelineError, match="differs from PyTorch by 0.5 in the logits"):
        export.export(model, info, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_foreign_and_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(PipelineError, match="nope.onnx: no such ONNX file; run `dvc repro export` first"):
        runtime.load(tmp_path / "nope.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(PipelineError, match=r"text.onnx: not a loadable ONNX file \(.+\)$"):
        runtime.load(tmp_path / "text.onnx")
    vector = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "bare", [vector],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", export.OPSET)], ir_version=10),
              tmp_path / "bare.onnx")
    with pytest.raises(PipelineError, match="bare.onnx: not a skinlesion-onnx/1 file"):
        runtime.load(tmp_path / "bare.onnx")


@pytest.mark.slow
def test_export_stage_and_prediction_on_the_onnx_file(synthetic_zips, tmp_path):
    project = make_project(tmp_path / "project", synthetic_zips, {"calibrate.tta": "flips"})
    result = run(["dvc", "repro", "export"], project)
    assert "Running stage 'export'" in result.stdout and "Running stage 'evaluate'" not in result.stdout
    assert "largest logit difference from PyTorch" in result.stderr
    session, info = runtime.load(project / "models/model.onnx")
    assert info.classes == list(CLASSES) and info.image_size == 32
    assert info.scoring.tta == "flips" and info.scoring.mel_threshold is not None
    tables = {}
    for name in ("model.pt", "model.onnx"):
        out = tmp_path / f"{name}.csv"
        predicted = subprocess.run([sys.executable, "-m", "skinlesion.predict", f"models/{name}",
                                    str(synthetic_zips / "HAM10000_images.zip"), "--metadata",
                                    str(synthetic_zips / "HAM10000_metadata.csv"),  # the defaults use it
                                    "-o", str(out)], cwd=project, capture_output=True, text=True)
        assert predicted.returncode == 0, predicted.stderr
        tables[name] = pd.read_csv(out)
    assert len(tables["model.pt"]) > 0
    assert tables["model.onnx"]["predicted"].tolist() == tables["model.pt"]["predicted"].tolist()
    columns = [f"p_{name}" for name in CLASSES]
    # ONNX scores in float32; the PyTorch path in the file's precision (bf16 where the CPU
    # has it, the answers near a decision again in float32): within the recheck margin.
    model_info = modelfile.load(project / "models/model.pt")[1]
    reduced = inference.scoring_dtype(model_info.scoring.precision, torch.device("cpu")) is not None
    bound = model_info.scoring.recheck if reduced else 1e-4
    np.testing.assert_allclose(tables["model.onnx"][columns], tables["model.pt"][columns], atol=bound)
    assert run(["dvc", "status", "export"], project).stdout.strip().endswith("up to date.")

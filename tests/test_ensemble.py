"""Ensembles: the members' probabilities (or logits) averaged, one member being the
model itself; one model file carrying the members, through predict and ONNX; the
heat map the mean of the members' maps; bad ensembles refused in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinlesion import CLASSES, PipelineError, modelfile, params
from skinlesion.deployment import export, runtime
from skinlesion.evaluation import explain, inference
from skinlesion.training import models
from tests.conftest import PROJECT
from tests.test_export import SCORING, images, small_model


def member(seed: int, name: str = "simple_cnn"):
    _, info = small_model(name, scoring=None)
    torch.manual_seed(seed)
    model = models.build(name, num_classes=len(CLASSES), image_size=info["image_size"], settings=info["settings"],
                         head=info["head"])
    return models.channels_last(model).eval(), info


def saved_members(tmp_path, count=3, name="simple_cnn") -> list:
    paths = []
    for seed in range(count):
        model, info = member(seed, name)
        path = tmp_path / f"{seed}.pt"
        modelfile.save(path, model, architecture=info["architecture"], settings=info["settings"], head=info["head"],
                       classes=CLASSES, image_size=info["image_size"], mean=info["mean"], std=info["std"],
                       training={"epoch": seed + 1})
        paths.append(path)
    return paths


@pytest.mark.parametrize("tta", ["none", "dihedral"])
def test_the_ensembles_probabilities_are_the_mean_of_its_members(tta):
    networks = [member(seed)[0] for seed in range(3)]
    info = {**member(0)[1], "scoring": {"tta": tta}}
    pixels = images(6, 32)
    alone = [inference.TorchPredictor(network, info).probabilities(pixels) for network in networks]
    together = inference.TorchPredictor(models.Ensemble(networks, "probabilities"), info).probabilities(pixels)
    np.testing.assert_allclose(together, np.mean(alone, axis=0), atol=1e-6)
    assert not np.allclose(alone[0], alone[1], atol=1e-3), "the members should differ"


def test_averaged_logits_are_the_mean_of_the_members_logits():
    networks = [member(seed)[0] for seed in range(2)]
    batch = inference.normalise(images(4, 32), member(0)[1], "cpu")
    with torch.no_grad():
        expected = torch.stack([network(batch) for network in networks]).mean(dim=0)
        np.testing.assert_allclose(models.Ensemble(networks, "logits")(batch), expected, atol=1e-6)


def test_one_member_is_scored_as_that_model():
    network, info = member(0)
    info = {**info, "scoring": SCORING}  # dihedral views, logit adjustment, temperature
    pixels = images(5, 32)
    np.testing.assert_allclose(inference.TorchPredictor(models.Ensemble([network]), info).probabilities(pixels),
                               inference.TorchPredictor(network, info).probabilities(pixels), atol=1e-6)


def test_one_members_file_is_that_members_file_with_its_scoring(tmp_path):
    (path,) = saved_members(tmp_path, 1)
    modelfile.save_ensemble([path], tmp_path / "model.pt", "probabilities", SCORING)
    modelfile.with_scoring(path, tmp_path / "plain.pt", SCORING)
    assert (tmp_path / "model.pt").read_bytes() == (tmp_path / "plain.pt").read_bytes()


def write_folder(folder, pixels):
    folder.mkdir()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"ISIC_{index:07d}.png")


def test_an_ensemble_file_round_trips_through_predict_and_onnx(tmp_path):
    paths = saved_members(tmp_path)
    target = tmp_path / "model.pt"
    modelfile.save_ensemble(paths, target, "probabilities", SCORING)
    model, info = modelfile.load(target)
    assert isinstance(model, models.Ensemble) and info.architecture == "ensemble"
    assert [m.training["epoch"] for m in info.members] == [1, 2, 3]
    pixels = images(7, 32)
    loaded = inference.TorchPredictor(model, info).probabilities(pixels)
    networks = [modelfile.load(path)[0] for path in paths]
    fresh = inference.TorchPredictor(models.Ensemble(networks), info.replace(scoring=SCORING)).probabilities(pixels)
    np.testing.assert_allclose(loaded, fresh, atol=1e-6)

    onnx_path = tmp_path / "model.onnx"
    difference = export.export(model, info, onnx_path)
    assert difference < 1e-4
    session, onnx_info = runtime.load(onnx_path)
    assert onnx_info.architecture == "ensemble" and len(onnx_info.members) == 3
    through_onnx = runtime.OnnxPredictor(session, onnx_info).probabilities(pixels)
    assert float(np.abs(through_onnx - loaded).max()) < 1e-4

    write_folder(tmp_path / "scans", pixels)  # PNG: lossless, so predict sees these very pixels
    for name in ("model.pt", "model.onnx"):
        out = tmp_path / f"{name}.csv"
        done = subprocess.run([sys.executable, "-m", "skinlesion.predict", str(tmp_path / name),
                               str(tmp_path / "scans"), "-o", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        table = pd.read_csv(out).sort_values("file")
        assert float(np.abs(table[[f"p_{c}" for c in CLASSES]].to_numpy() - loaded).max()) < 1e-4


def test_members_that_disagree_are_refused_in_one_line(tmp_path):
    paths = saved_members(tmp_path, 2)
    model, info = member(5)
    other = tmp_path / "other.pt"
    modelfile.save(other, model, architecture="simple_cnn", settings=info["settings"], head=info["head"],
                   classes=list(reversed(CLASSES)), image_size=32, mean=info["mean"], std=info["std"], training={})
    with pytest.raises(PipelineError, match=r"other.pt and .*0.pt differ in their classes"):
        modelfile.save_ensemble([paths[0], other], tmp_path / "model.pt", "probabilities", SCORING)
    with pytest.raises(PipelineError, match="differ in their classes"):
        modelfile.load_members([paths[0], other], "probabilities")
    assert not (tmp_path / "model.pt").exists()


def test_an_edited_ensemble_file_is_refused_in_one_line(tmp_path):
    paths = saved_members(tmp_path, 2)
    target = tmp_path / "model.pt"
    modelfile.save_ensemble(paths, target, "probabilities", SCORING)
    payload = torch.load(target, weights_only=True)
    for edit, message in [({"members": None}, "lists no members"),
                          ({"settings": {"combine": "votes"}}, "an ensemble's settings are"),
                          ({"members": [{**payload["members"][0], "architecture": "alexnet"}, payload["members"][1]]},
                           "members.0.architecture"),
                          ({"architecture": "simple_cnn"}, "has no members")]:
        torch.save({**payload, **edit}, tmp_path / "edited.pt")
        with pytest.raises(PipelineError, match=message):
            modelfile.load(tmp_path / "edited.pt")


def test_the_ensembles_heat_map_is_the_mean_of_its_members_maps():
    networks = [member(seed)[0] for seed in range(2)]
    batch = inference.normalise(images(3, 32), member(0)[1], "cpu")
    target = torch.tensor([0, 3, 6])
    maps = [explain.heatmaps(network, batch, target=target)[0] for network in networks]
    got, layer = explain.member_heatmaps(models.Ensemble(networks), batch, method="gradcam", target=target)
    mean = np.mean(maps, axis=0)
    np.testing.assert_allclose(got, mean / mean.reshape(3, -1).max(axis=1).reshape(3, 1, 1), atol=1e-6)
    assert layer.startswith("mean of 2 members at ")
    alone, layer_alone = explain.member_heatmaps(networks[0], batch, method="gradcam", target=target)
    np.testing.assert_allclose(alone, maps[0])
    assert "members" not in layer_alone


def test_ensemble_params_are_checked():
    with pytest.raises(PipelineError, match="lists a seed twice"):
        params.check(params.schema_at("ensemble"), {"seeds": [1, 1], "combine": "logits"}, "ensemble")
    with pytest.raises(PipelineError, match="ensemble.combine"):
        params.check(params.schema_at("ensemble"), {"seeds": [1], "combine": "votes"}, "ensemble")
    train = params.read_yaml(PROJECT / "params.yaml")["train"]
    with pytest.raises(PipelineError, match=r"train.seed is now ensemble.seeds.*ensemble.seeds=\[3\]"):
        params.check(params.schema_at("train"), {**train, "seed": 3}, "train")

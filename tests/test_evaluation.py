"""Metrics against hand-computed values, Grad-CAM and its lesion scores, and the
prediction and scoring commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from skinlesion.evaluation import explain, metrics
from skinlesion.training import models

# Four test images of classes 0 and 1; image 1 is wrong (class 0 predicted as 1).
LABELS = np.array([0, 0, 1, 1])
PROBABILITIES = np.array([
    [0.90, 0.10, 0.00, 0, 0, 0, 0],
    [0.25, 0.60, 0.15, 0, 0, 0, 0],
    [0.20, 0.80, 0.00, 0, 0, 0, 0],
    [0.30, 0.70, 0.00, 0, 0, 0, 0],
])


def test_metrics_match_hand_computed_values():
    result = metrics.evaluate(LABELS, PROBABILITIES)
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 2) / 2)  # recall 0.5 and 1.0
    assert result["accuracy"] == pytest.approx(3 / 4)
    # class 0 vs rest: positives score 0.90, 0.25; negatives 0.20, 0.30 -> 3 of 4 pairs ordered
    assert result["per_class"]["akiec"]["roc_auc"] == pytest.approx(0.75)
    assert result["per_class"]["bcc"]["roc_auc"] == pytest.approx(1.0)
    assert result["macro_roc_auc"] == pytest.approx(0.875)  # classes with no positive have no AUC
    assert "roc_auc" not in result["per_class"]["mel"]
    # confidences 0.9, 0.6, 0.8, 0.7 in separate bins, correct 1, 0, 1, 1
    assert result["expected_calibration_error"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.3) / 4)
    assert result["per_class"]["bcc"]["precision"] == pytest.approx(2 / 3)
    assert result["per_class"]["akiec"]["support"] == 2 and result["per_class"]["vasc"]["support"] == 0
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_melanoma_sensitivity_at_fixed_specificity():
    positive = np.array([1, 1, 0, 0, 0], dtype=bool)
    score = np.array([0.9, 0.4, 0.5, 0.1, 0.2])
    assert metrics.sensitivity_at_specificity(positive, score, 0.9) == pytest.approx(0.5)
    assert metrics.sensitivity_at_specificity(positive, score, 0.66) == pytest.approx(1.0)


def test_reliability_bins():
    rows = metrics.reliability(LABELS, PROBABILITIES)
    assert [r["count"] for r in rows] == [1, 1, 1, 1]
    assert [r["accuracy"] for r in rows] == [0.0, 1.0, 1.0, 1.0]  # sorted by confidence 0.6, 0.7, 0.8, 0.9


@pytest.mark.parametrize("name", ["simple_cnn", "resnet_transformer", "vit_b_16"])
@pytest.mark.parametrize("method", explain.METHODS)
def test_heat_maps_have_the_image_shape(name, method):
    torch.manual_seed(0)
    settings = {"layers": 1, "heads": 2, "hidden_dim": 16, "mlp_dim": 16} if name == "vit_b_16" else {}
    model = models.build(name, num_classes=7, image_size=64, settings=settings, head={"hidden": 8, "dropout": 0})
    cams, logits = explain.heatmaps(model, torch.randn(2, 3, 64, 64), method=method)
    assert cams.shape == (2, 64, 64) and logits.shape == (2, 7)
    assert cams.min() >= 0 and cams.max() <= 1 + 1e-6


def test_lesion_scores_inside_and_outside_the_mask():
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 1
    inside = np.zeros((16, 16))
    inside[6:10, 6:10] = 1.0
    assert explain.lesion_scores(inside, mask) == (1.0, True)
    outside = np.zeros((16, 16))
    outside[0:2, :] = 0.5
    outside[0, 0] = 1.0
    assert explain.lesion_scores(outside, mask) == (0.0, False)
    assert explain.lesion_scores(np.zeros((16, 16)), mask) is None
    half = np.zeros((16, 16))
    half[8, 8], half[0, 0] = 1.0, 1.0
    assert explain.lesion_scores(half, mask)[0] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from skinlesion import CLASSES, modelfile

    torch.manual_seed(0)
    model = models.build("simple_cnn", num_classes=7, image_size=32, settings={}, head={"hidden": 8, "dropout": 0})
    path = tmp_path_factory.mktemp("model") / "model.pt"
    modelfile.save(path, model, architecture="simple_cnn", settings={}, head={"hidden": 8, "dropout": 0},
                   classes=CLASSES, image_size=32, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, training={})
    return path


def test_predict_command_reports_bad_files_and_keeps_going(model_file, synthetic_folder, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(synthetic_folder / "HAM10000_images_part_1", folder)
    good = sorted(folder.iterdir())
    (folder / "broken.jpg").write_bytes(good[0].read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    result = subprocess.run([sys.executable, "-m", "skinlesion.predict", str(model_file), str(folder),
                             "-o", str(tmp_path / "out.csv")], capture_output=True, text=True)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert any("images/broken.jpg is not a readable image" in e for e in errors)
    assert any("images/notes.txt is not an image" in e for e in errors)
    table = pd.read_csv(tmp_path / "out.csv")
    assert sorted(table.image_id) == sorted(p.stem for p in good)
    probabilities = table[[c for c in table.columns if c.startswith("p_")]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert set(table.predicted) <= {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}


def test_predict_command_on_a_single_image_and_a_missing_model(model_file, synthetic_folder, tmp_path):
    image = sorted((synthetic_folder / "HAM10000_images_part_1").iterdir())[0]
    ok = subprocess.run([sys.executable, "-m", "skinlesion.predict", str(model_file), str(image),
                         "-o", str(tmp_path / "one.csv")], capture_output=True, text=True)
    assert ok.returncode == 0 and len(pd.read_csv(tmp_path / "one.csv")) == 1
    missing = subprocess.run([sys.executable, "-m", "skinlesion.predict", str(tmp_path / "nope.pt"), str(image),
                              "-o", str(tmp_path / "x.csv")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.pt: no such model file" in missing.stderr
    assert not (tmp_path / "x.csv").exists()


def test_score_command_writes_the_evaluate_metrics(model_file, synthetic_zips, tmp_path):
    result = subprocess.run([sys.executable, "-m", "skinlesion.predict", "--score", str(model_file),
                             str(synthetic_zips), "-o", str(tmp_path / "m.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    scored = json.loads((tmp_path / "m.json").read_text())
    assert scored["images"] == len(pd.read_csv(synthetic_zips / "HAM10000_metadata.csv"))
    assert {"balanced_accuracy", "macro_roc_auc", "expected_calibration_error", "per_class"} <= set(scored)


class _Payload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_model_file_cannot_run_code(tmp_path):
    from skinlesion import PipelineError, modelfile

    marker = tmp_path / "pwned"
    torch.save({"format": "skinlesion-model/1", "state_dict": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(PipelineError, match="evil.pt: not a loadable model file"):
        modelfile.load(tmp_path / "evil.pt")
    assert not marker.exists()

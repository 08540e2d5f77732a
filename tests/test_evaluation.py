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
    result, details = metrics.report(LABELS, PROBABILITIES, np.array(["a", "b", "c", "d"]), resamples=50)
    assert list(result)[:4] == ["balanced_accuracy", "accuracy", "macro_f1", "macro_roc_auc"]  # the headline first
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 2) / 2)  # recall 0.5 and 1.0
    assert result["accuracy"] == pytest.approx(3 / 4)
    assert result["recall"]["akiec"] == pytest.approx(0.5) and result["recall"]["bcc"] == pytest.approx(1.0)
    # class 0 vs rest: positives score 0.90, 0.25; negatives 0.20, 0.30 -> 3 of 4 pairs ordered
    assert details["per_class"]["akiec"]["roc_auc"] == pytest.approx(0.75)
    assert details["per_class"]["bcc"]["roc_auc"] == pytest.approx(1.0)
    assert result["macro_roc_auc"] == pytest.approx(0.875)  # classes with no positive have no AUC
    assert "roc_auc" not in details["per_class"]["mel"]
    # confidences 0.9, 0.6, 0.8, 0.7 in separate bins, correct 1, 0, 1, 1
    assert result["expected_calibration_error"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.3) / 4)
    assert details["per_class"]["bcc"]["precision"] == pytest.approx(2 / 3)
    assert details["per_class"]["akiec"]["support"] == 2 and details["per_class"]["vasc"]["support"] == 0
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result["images"] == 4 and result["lesions"] == 4


def _noisy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, n)
    probabilities = rng.random((n, 7))
    probabilities[np.arange(n), labels] += 0.6
    return labels, probabilities / probabilities.sum(1, keepdims=True)


def test_intervals_resample_lesions_not_images():
    labels, probabilities = _noisy(300, 0)
    # every lesion photographed three times: the same label and (near enough) the same prediction
    labels, probabilities = np.repeat(labels, 3), np.repeat(probabilities, 3, axis=0)
    by_lesion = np.repeat(np.arange(300), 3)
    grouped, _ = metrics.report(labels, probabilities, by_lesion, resamples=400, seed=1)
    naive, _ = metrics.report(labels, probabilities, np.arange(900), resamples=400, seed=1)
    for key in ("balanced_accuracy", "accuracy", "macro_roc_auc"):
        low, high = grouped["ci95"][key]["low"], grouped["ci95"][key]["high"]
        assert low < grouped[key] < high
        width, naive_width = high - low, naive["ci95"][key]["high"] - naive["ci95"][key]["low"]
        assert width > 1.4 * naive_width  # about sqrt(3) wider: 300 independent lesions, not 900 images
    assert grouped["lesions"] == 300 and grouped["ci95"]["resamples"] == 400
    again, _ = metrics.report(labels, probabilities, by_lesion, resamples=400, seed=1)
    assert again == grouped  # the seed makes the intervals repeatable


def test_the_melanoma_operating_point_applies_the_validation_threshold_once():
    labels, probabilities = _noisy(500, 2)
    mel = 4
    threshold = 0.3
    result, _ = metrics.report(labels, probabilities, np.arange(500), mel_threshold=threshold, resamples=100)
    flagged = probabilities[:, mel] >= threshold
    assert result["melanoma"]["threshold"] == threshold
    assert result["melanoma"]["sensitivity"] == pytest.approx(flagged[labels == mel].mean())
    assert result["melanoma"]["specificity"] == pytest.approx((~flagged[labels != mel]).mean())
    assert "melanoma_sensitivity" in result["ci95"] and "melanoma_specificity" in result["ci95"]


def test_weighted_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    labels, probabilities = _noisy(200, 3)
    weight = np.random.default_rng(4).integers(0, 4, 200).astype(float)
    score = probabilities[:, 1].round(2)  # with ties
    assert metrics.weighted_auc(labels == 1, score, weight) == pytest.approx(
        roc_auc_score(labels == 1, score, sample_weight=weight))


def test_bootstrap_draws_scored_together_equal_each_draw_scored_alone_by_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    labels, probabilities = _noisy(150, 5)
    labels[labels == 3] = 2
    labels[0] = 3  # a class of one image, that some draws miss: no recall and no AUC for it there
    probabilities = probabilities.round(2)  # with ties
    predicted = probabilities.argmax(axis=1)
    flagged = probabilities[:, 4] >= 0.2
    lesions = np.arange(150) // 2
    weights = np.stack(list(metrics._lesion_weights(lesions, 40, np.random.default_rng(6))))
    together = metrics._weighted_figures(labels, predicted, probabilities, weights, flagged)
    for draw, weight in enumerate(weights):
        # an image drawn k times is k copies of it, scored as one data set
        copies = np.repeat(np.arange(150), weight.astype(int))
        y, p = labels[copies], probabilities[copies]
        present = sorted(set(y.tolist()))
        assert together["balanced_accuracy"][draw] == pytest.approx(balanced_accuracy_score(y, p.argmax(axis=1)))
        assert together["accuracy"][draw] == pytest.approx((p.argmax(axis=1) == y).mean())
        assert together["macro_f1"][draw] == pytest.approx(
            f1_score(y, p.argmax(axis=1), labels=present, average="macro", zero_division=0))
        aucs = [roc_auc_score(y == c, p[:, c]) for c in range(7) if 0 < (y == c).sum() < len(y)]
        assert together["macro_roc_auc"][draw] == pytest.approx(np.mean(aucs))
        assert np.isnan(together["recall.df"][draw]) == (3 not in present)
        mel = y == 4
        assert together["melanoma_sensitivity"][draw] == pytest.approx(flagged[copies][mel].mean())
        assert together["melanoma_specificity"][draw] == pytest.approx((~flagged[copies][~mel]).mean())
    assert np.isnan(together["recall.df"]).any() and not np.isnan(together["recall.df"]).all()


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
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heat_maps_have_the_image_shape(name, method):
    torch.manual_seed(0)
    settings = {"layers": 1, "heads": 2, "hidden_dim": 16, "mlp_dim": 16} if name == "vit_b_16" else {}
    model = models.build(name, num_classes=7, image_size=64, settings=settings, head={"hidden": 8, "dropout": 0})
    cams, logits, layer = explain.heatmaps(model, torch.randn(2, 3, 64, 64), method=method)
    assert cams.shape == (2, 64, 64) and logits.shape == (2, 7) and layer in model.cam_layers
    assert cams.min() >= 0 and cams.max() <= 1 + 1e-6


@pytest.mark.parametrize("size, layer", [(128, "backbone.7"), (64, "backbone.6"), (32, "backbone.5"),
                                         (16, "backbone.5")])
def test_grad_cam_explains_the_deepest_map_with_enough_cells(size, layer):
    # ResNet-18's last block is size/32 cells a side; its upsampled 2 x 2 map always
    # peaks in a corner, so at 64 px the block before it (4 x 4) is explained instead;
    # at 16 px no layer reaches 4 cells, and the finest one (2 x 2) is used.
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=7, image_size=size, settings={}, head={"hidden": 8, "dropout": 0})
    cams, _, chosen = explain.heatmaps(model, torch.randn(2, 3, size, size))
    assert chosen == layer and cams.shape == (2, size, size)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_predict_command_on_a_single_image_and_a_missing_model(model_file, synthetic_folder, tmp_path):
    image = sorted((synthetic_folder / "HAM10000_images_part_1").iterdir())[0]
    ok = subprocess.run([sys.executable, "-m", "skinlesion.predict", str(model_file), str(image),
                         "-o", str(tmp_path / "one.csv")], capture_output=True, text=True)
    assert ok.returncode == 0 and len(pd.read_csv(tmp_path / "one.csv")) == 1
    missing = subprocess.run([sys.executable, "-m", "skinlesion.predict", str(tmp_path / "nope.pt"), str(image),
                              "-o", str(tmp_path / "x.csv")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.pt: no such model file" in missing.stderr
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.slow
def test_score_command_writes_the_evaluate_metrics_and_the_old_form_still_works(model_file, synthetic_zips, tmp_path):
    result = subprocess.run([sys.executable, "-m", "skinlesion.score", str(model_file),
                             str(synthetic_zips), "-o", str(tmp_path / "m.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stderr
    scored = json.loads((tmp_path / "m.json").read_text())
    assert scored["images"] == len(pd.read_csv(synthetic_zips / "HAM10000_metadata.csv"))
    assert {"balanced_accuracy", "macro_roc_auc", "expected_calibration_error", "recall", "ci95"} <= set(scored)
    old = subprocess.run([sys.executable, "-m", "skinlesion.predict", "--score", str(model_file),
                          str(synthetic_zips), "-o", str(tmp_path / "old.json")], capture_output=True, text=True)
    assert old.returncode == 0, old.stderr
    notes = [line for line in old.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "python -m skinlesion.score MODEL SOURCE" in notes[0]
    assert json.loads((tmp_path / "old.json").read_text()) == scored


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


def _predictions(path, labels, probabilities, ids):
    frame = pd.DataFrame({"image_id": ids, **{f"p_{c}": probabilities[:, i] for i, c in enumerate(metrics.CLASSES)},
                          "actual": [metrics.CLASSES[i] for i in labels]})
    frame.to_csv(path, index=False)
    return path


def _compare(*args):
    return subprocess.run([sys.executable, "-m", "skinlesion.evaluation.compare", *map(str, args)],
                          capture_output=True, text=True)


def test_compare_gives_the_difference_of_two_sets_with_a_lesion_interval(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 20)  # images 10k..10k+9 are lesion Lk, one class each
    good = np.eye(7)[labels] * 0.8 + 0.2 / 7
    wrong = np.repeat(rng.random(len(labels) // 10) < 0.4, 10)  # a lesion's 10 images are right or wrong together
    noisy = np.where(wrong, (labels + 1) % 7, labels)
    bad = np.eye(7)[noisy] * 0.8 + 0.2 / 7
    ids = [f"ISIC_{i:07d}" for i in range(len(labels))]
    a = _predictions(tmp_path / "a.csv", labels, good, ids)
    b = _predictions(tmp_path / "b.csv", labels, bad, ids)
    # first: each image its own lesion; then lesions of 10 images sharing one class
    pd.DataFrame({"image_id": ids, "lesion_id": ids}).to_csv(tmp_path / "single.csv", index=False)
    pd.DataFrame({"image_id": ids, "lesion_id": [f"L{i // 10}" for i in range(len(ids))]}).to_csv(
        tmp_path / "grouped.csv", index=False)
    widths = {}
    for name in ("single", "grouped"):
        result = _compare(a, b, "--lesions", tmp_path / f"{name}.csv", "--resamples", 300)
        assert result.returncode == 0, result.stderr
        gap = json.loads(result.stdout[:result.stdout.index("\n\n|")])["balanced_accuracy"]
        expected = float(np.mean([(noisy[labels == c] == c).mean() for c in range(7)])) - 1.0
        assert gap["a"] == 1.0 and gap["difference"] == pytest.approx(expected, abs=1e-4)
        assert gap["ci95"]["low"] < gap["difference"] < gap["ci95"]["high"] < 0
        widths[name] = gap["ci95"]["high"] - gap["ci95"]["low"]
    assert widths["grouped"] > widths["single"]  # correlated images: fewer independent draws, wider interval
    assert "| balanced_accuracy | 1.000 |" in result.stdout


def test_compare_refuses_bad_input_in_one_line(tmp_path):
    labels = np.arange(7)
    a = _predictions(tmp_path / "a.csv", labels, np.eye(7), [f"ISIC_{i:07d}" for i in range(7)])
    pd.DataFrame({"image_id": ["ISIC_0000000"], "lesion_id": ["L"]}).to_csv(tmp_path / "few.csv", index=False)
    pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(7)], "lesion_id": "L"}).to_csv(tmp_path / "all.csv",
                                                                                          index=False)
    (tmp_path / "nolesion.csv").write_text("image_id\nISIC_0000000\n")
    for args, code, message in [
        ((a, a, "--lesions", tmp_path / "few.csv"), 2, "6 image_id(s) not in the --lesions CSV"),
        ((a, a, "--lesions", tmp_path / "nolesion.csv"), 2, "no column(s) lesion_id"),
        ((a, tmp_path / "absent.csv", "--lesions", tmp_path / "all.csv"), 1, "absent.csv: no such file"),
        ((a, a), 2, "the following arguments are required: --lesions"),
    ]:
        result = _compare(*args)
        assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scoring_on_the_gpu_matches_the_cpu():
    # calibrate, evaluate and explain score on the GPU when there is one: in float32
    # without TF32, so the probabilities and heat maps are the CPU's.
    from skinlesion.evaluation import inference

    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=7, image_size=64, settings={}, head={"hidden": 8, "dropout": 0})
    info = {"architecture": "resnet18", "image_size": 64, "mean": list(models.IMAGENET_MEAN),
            "std": list(models.IMAGENET_STD), "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]}
    images = np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    masks, has_mask = np.ones((10, 64, 64), np.uint8), np.ones(10, bool)
    on_cpu = inference.view_logits(model, info, images, tta="dihedral", batch_size=4)
    rows_cpu, cams_cpu = explain.score_split(model, info, images, masks, has_mask, method="gradcam",
                                             batch_size=4, keep=set(range(10)))
    device = inference.scoring_device()
    assert device.type == "cuda"
    model = model.to(device)
    on_gpu = inference.view_logits(model, info, images, tta="dihedral", batch_size=4, device=device)
    rows_gpu, cams_gpu = explain.score_split(model, info, images, masks, has_mask, method="gradcam",
                                             batch_size=4, keep=set(range(10)), device=device)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
    assert [row["predicted"] for row in rows_gpu] == [row["predicted"] for row in rows_cpu]
    for index in range(10):
        np.testing.assert_allclose(cams_gpu[index], cams_cpu[index], atol=1e-3)


def test_calibration_change_says_whether_temperature_scaling_helps_with_a_paired_interval():
    from scipy.special import softmax

    from skinlesion.evaluation.metrics import calibration_change, expected_calibration_error, weighted_ece

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, 1500)
    logits = rng.normal(size=(1500, 7)) + 1.5 * np.eye(7)[labels]
    lesions = np.arange(1500) // 2
    overconfident, tempered = softmax(logits * 4, axis=1), softmax(logits, axis=1)
    assert weighted_ece(labels, tempered, np.ones(1500)) == pytest.approx(expected_calibration_error(labels, tempered))
    change = calibration_change(labels, tempered, overconfident, lesions, resamples=200, seed=0)
    assert change["ece_after"] < change["ece_before"] and change["verdict"] == "helps"
    assert change["ci95"]["low"] <= change["difference"] <= change["ci95"]["high"] < 0
    worse = calibration_change(labels, overconfident, tempered, lesions, resamples=200, seed=0)
    assert worse["verdict"] == "hurts" and worse["ci95"]["low"] > 0
    same = calibration_change(labels, tempered, tempered, lesions, resamples=50, seed=0)
    assert same["difference"] == 0 and same["verdict"] == "no measurable change"


def test_explain_reads_the_classes_evaluate_predicted_and_refuses_a_stale_file(tmp_path):
    from skinlesion import CLASSES, PipelineError
    from skinlesion.files import write_csv

    ids = ["ISIC_1", "=HYPERLINK(1)", "ISIC_3"]
    path = tmp_path / "predictions.csv"
    write_csv(path, pd.DataFrame({"image_id": ids, "p_mel": [0.1, 0.2, 0.3], "actual": ["nv"] * 3,
                                  "predicted": ["mel", "nv", "bcc"]}), for_people=True)
    assert explain.predicted_classes(path, ids, CLASSES).tolist() == [CLASSES.index(c) for c in ("mel", "nv", "bcc")]
    with pytest.raises(PipelineError, match="not the 2 test images"):
        explain.predicted_classes(path, ids[:2], CLASSES)
    with pytest.raises(PipelineError, match="not the 3 test images"):
        explain.predicted_classes(path, ids[::-1], CLASSES)
    with pytest.raises(PipelineError, match="'mel' is not one of"):
        explain.predicted_classes(path, ids, ["nv", "bcc"])
    with pytest.raises(PipelineError, match="no such file.*dvc repro evaluate"):
        explain.predicted_classes(tmp_path / "missing.csv", ids, CLASSES)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(PipelineError, match="no image_id, predicted column"):
        explain.predicted_classes(tmp_path / "other.csv", ids, CLASSES)

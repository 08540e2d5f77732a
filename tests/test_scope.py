"""The out-of-scope score: the Mahalanobis distance as the model computes it, the
candidates' formulas, the threshold kept on validation, and a model file that carries
it through predict, ONNX and the page."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinlesion import CLASSES, PipelineError, modelfile, params
from skinlesion.app.server import Analyst
from skinlesion.deployment import export, runtime
from skinlesion.evaluation import inference, scope, scope_sets
from skinlesion.training import models
from tests.test_ensemble import saved_members
from tests.test_export import SCORING, images


def test_the_models_distance_is_the_mahalanobis_distance_to_the_nearest_class_mean():
    rng = np.random.default_rng(0)
    means, features = rng.normal(size=(7, 5)), rng.normal(size=(9, 5))
    root = rng.normal(size=(5, 5))
    precision = root @ root.T + np.eye(5)
    expected = np.min([[(f - m) @ precision @ (f - m) for m in means] for f in features], axis=1)
    whitening = np.linalg.cholesky(precision)  # W W^T = the precision
    got = models.Scope(torch.tensor(means), torch.tensor(whitening))(torch.tensor(features, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_fitted_on_clusters_far_points_score_higher_and_the_threshold_keeps_its_share():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=5, size=(7, 8))
    labels = rng.integers(0, 7, 2000)
    features = centres[labels] + rng.normal(size=(2000, 8))
    means, whitening = scope.fit_mahalanobis(features, labels, 7)
    np.testing.assert_allclose(means, centres, atol=0.3)
    model = models.Scope(torch.from_numpy(means), torch.from_numpy(whitening))
    near = model(torch.tensor(centres[labels[:500]] + rng.normal(size=(500, 8)), dtype=torch.float32)).numpy()
    far = model(torch.tensor(rng.normal(scale=30, size=(500, 8)), dtype=torch.float32)).numpy()
    limit = scope.threshold(near, 0.95)
    assert (near <= limit).mean() >= 0.95 and (far > limit).mean() > 0.9
    figures = scope.separation(near, far, limit)
    assert figures["auroc"] > 0.95 and figures["fpr_at_95"] < 0.1 and figures["in_distribution_kept"] >= 0.95
    with pytest.raises(PipelineError, match="class 6 has no train image"):
        scope.fit_mahalanobis(features[labels < 6], labels[labels < 6], 7)



def test_features_that_hardly_vary_give_a_distance_that_rounding_does_not_move():
    # An untrained network's pooled features: the same vector to within 1e-9 of its size.
    # Without a floor under the variances, float32 rounding (1e-7 of the features, as
    # between PyTorch and ONNX Runtime) moved the distance by thousands.
    rng = np.random.default_rng(2)
    base = rng.uniform(0.0, 0.1, size=256)
    labels = np.arange(140) % 7
    features = base + 1e-10 * rng.normal(size=(140, 256))
    means, whitening = scope.fit_mahalanobis(features, labels, 7)
    model = models.Scope(torch.from_numpy(means), torch.from_numpy(whitening))
    probe = torch.tensor(features[:20], dtype=torch.float32)
    rounded = probe * (1 + 1e-7 * torch.from_numpy(rng.choice([-1.0, 1.0], size=(20, 256))).float())
    exact, moved = model(probe).numpy(), model(rounded).numpy()
    assert np.abs(moved - exact).max() < 1e-3
    # Features that do vary are left to the shrunk covariance: far points still stand out.
    spread = rng.normal(size=(7, 256))[labels] + rng.normal(size=(140, 256))
    means, whitening = scope.fit_mahalanobis(spread, labels, 7)
    model = models.Scope(torch.from_numpy(means), torch.from_numpy(whitening))
    near = model(torch.tensor(spread[:50], dtype=torch.float32)).numpy()
    far = model(torch.tensor(10 * rng.normal(size=(50, 256)), dtype=torch.float32)).numpy()
    assert far.min() > near.max()

def test_the_candidates_formulas_and_their_direction():
    probabilities = np.array([[0.9, 0.1], [0.5, 0.5]])
    np.testing.assert_allclose(scope.scores("msp", probabilities=probabilities), [0.1, 0.5])
    logits = np.array([[10.0, 0.0], [0.1, 0.0]])  # a confident image has the lower (more inside) energy
    energy = scope.scores("energy", logits=logits)
    assert energy[0] < energy[1]
    with pytest.raises(PipelineError, match="calibrate.scope is 'odin'"):
        scope.scores("odin", logits=logits)
    assert scope.separation(np.zeros(50), np.ones(50))["auroc"] == 1.0
    assert scope.separation(np.arange(50.0), np.arange(50.0))["auroc"] == 0.5


def test_the_sets_are_fixed_and_hold_every_kind():
    first, kinds = scope_sets.far(32, per_kind=3, seed=4)
    again, _ = scope_sets.far(32, per_kind=3, seed=4)
    assert np.array_equal(first, again) and first.shape[1:] == (32, 32, 3)
    assert set(kinds) == {"photo", *scope_sets.GENERATED} and kinds.count("photo") >= 3 * 25
    checkerboard = first[kinds.index("checkerboard")]
    assert {tuple(c) for c in checkerboard.reshape(-1, 3)} == {(255, 220, 0), (20, 60, 200)}  # blue and yellow
    lesions = images(10, 32)
    masks = np.zeros((10, 32, 32), np.uint8)
    masks[:, 8:24, 8:24] = 255
    broken, kinds = scope_sets.near(lesions, masks, np.arange(10) < 5, per_kind=4, seed=0)
    assert set(kinds) == set(scope_sets.CORRUPTIONS) and len(kinds) == 4 * len(scope_sets.CORRUPTIONS)
    assert broken[kinds.index("under_exposed")].max() <= 31
    grey = broken[kinds.index("greyscale")]
    assert (grey[..., 0] == grey[..., 1]).all()
    assert set(np.unique(broken[kinds.index("mask")])) <= {0, 255}


def far_sample() -> np.ndarray:
    pictures, kinds = scope_sets.far(32, per_kind=1)
    return pictures[[kinds.index(kind) for kind in ("photo", *scope_sets.GENERATED)]]


def far_board() -> np.ndarray:
    pictures, kinds = scope_sets.far(32, per_kind=1)
    return pictures[kinds.index("checkerboard")]


def scoped_model_file(tmp_path, members=1, features="stages"):
    """A model file carrying the Mahalanobis score, fitted on random 'train' images."""
    paths = saved_members(tmp_path, members)
    model, info = modelfile.load_members(paths, "probabilities")
    predictor = inference.TorchPredictor(model, info.replace(scoring=SCORING))
    train = images(70, 32, seed=3)
    state = inference.attach_mahalanobis(predictor, (train, np.arange(70) % 7, None))
    val = images(40, 32, seed=4)
    found, _ = inference.fit_scope(predictor, "energy", 0.95, train=(train, np.arange(70) % 7, None),
                                   val=(val, None), val_probabilities=None)
    assert found["method"] == "energy"
    found, state = inference.fit_scope(predictor, "mahalanobis", 0.95, train=(train, np.arange(70) % 7, None),
                                       val=(val, None), val_probabilities=None, features=features)
    target = tmp_path / "model.pt"
    modelfile.save_ensemble(paths, target, "probabilities", SCORING, found, state)
    predictor.info = predictor.info.replace(scope=found)  # the fitted network, as the file describes it
    return target, predictor


def test_the_score_measures_the_backbone_stages_beside_the_last():
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=7, image_size=32, settings={}, head={"hidden": 8, "dropout": 0})
    model.eval()
    batch = torch.rand(2, 3, 32, 32)
    _, last = model.forward_features(batch)
    models.pool_stages(model, "stages")
    logits, staged = model.forward_features(batch)
    assert model.feature_stages == (5, 6, 7) and staged.shape == (2, 128 + 256 + 512)  # layer2, layer3, layer4
    torch.testing.assert_close(staged[:, -512:], last)  # the last stage's features, as before, at the end
    torch.testing.assert_close(logits, model(batch))
    models.pool_stages(model, "last")
    assert model.forward_features(batch)[1].shape == (2, 512)
    vit = models.build("vit_b_16", num_classes=7, image_size=32, settings={"layers": 1, "heads": 2, "hidden_dim": 8,
                                                                           "mlp_dim": 8}, head={"hidden": 0, "dropout": 0})
    assert vit.stages() == ()  # no sequence of stages: the last features alone
    with pytest.raises(PipelineError, match="expected one of last, stages"):
        models.pool_stages(model, "all")


def test_a_file_from_before_the_stages_measures_the_last_features(tmp_path):
    model, info = modelfile.load(scoped_model_file(tmp_path)[0])
    assert info.scope.features == "stages" and model.feature_stages == model.stages() != ()
    # a file written before the field: its score was fitted on the last stage's features
    target, fitted = scoped_model_file(tmp_path / "old", features="last")
    payload = torch.load(target, weights_only=False)
    del payload["scope"]["features"]
    torch.save(payload, target)
    model, info = modelfile.load(target)
    assert info.scope.features == "last" and model.feature_stages == ()
    pixels = np.concatenate([images(6, 32, seed=3), far_sample()])
    np.testing.assert_allclose(inference.TorchPredictor(model, info).scope_scores(pixels), fitted.scope_scores(pixels),
                               rtol=1e-5)


@pytest.mark.parametrize("members", [1, 2])
def test_a_model_file_carries_the_score_through_predict_and_onnx(tmp_path, members):
    target, fitted = scoped_model_file(tmp_path, members)
    model, info = modelfile.load(target)
    assert info.scope.method == "mahalanobis" and model.scope.means.shape[0] == len(CLASSES)
    loaded = inference.TorchPredictor(model, info)
    inside, outside = images(6, 32, seed=3), far_sample()
    pixels = np.concatenate([inside, outside])
    scores = loaded.scope_scores(pixels)
    np.testing.assert_allclose(scores, fitted.scope_scores(pixels), rtol=1e-5)
    assert loaded.in_scope(scores).tolist() == (scores <= info.scope.threshold).tolist()
    assert export.export(model, info, tmp_path / "model.onnx") < 1e-3
    session, onnx_info = runtime.load(tmp_path / "model.onnx")
    assert onnx_info.scope == info.scope
    onnx_scores = runtime.OnnxPredictor(session, onnx_info).scope_scores(pixels)
    assert float((np.abs(onnx_scores - scores) / np.maximum(scores, 1)).max()) < 1e-3

    folder = tmp_path / "scans"
    folder.mkdir()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"ISIC_{index:07d}.png")
    for name in ("model.pt", "model.onnx"):
        out = tmp_path / f"{name}.csv"
        done = subprocess.run([sys.executable, "-m", "skinlesion.predict", str(tmp_path / name), str(folder),
                               "-o", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        table = pd.read_csv(out).sort_values("image_id")
        np.testing.assert_allclose(table["scope_score"], scores, rtol=1e-3, atol=1e-3)
        assert table["in_scope"].tolist() == loaded.in_scope(scores).astype(int).tolist()
        assert (table["melanoma_flag"] <= table["in_scope"]).all(), "an image out of scope raised the flag"
        assert "out of scope" in done.stderr


def test_the_page_answers_an_image_out_of_scope_with_a_notice(tmp_path):
    target, _ = scoped_model_file(tmp_path)
    analyst = Analyst(target)
    board = far_board()  # the blue-and-yellow checkerboard
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(board).save(buffer, format="PNG")
    answer = analyst.analyse("board.png", buffer.getvalue())
    assert answer["in_scope"] is False and answer["scope_score"] > analyst.info.scope.threshold
    assert answer["melanoma"] is None or answer["melanoma"]["flag"] is False


def test_a_file_claiming_the_score_without_its_tensors_is_refused_in_one_line(tmp_path):
    target, _ = scoped_model_file(tmp_path)
    payload = torch.load(target, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("scope.")}
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(PipelineError, match="edited.pt: its out-of-scope score has no class means"):
        modelfile.load(tmp_path / "edited.pt")
    payload = torch.load(target, weights_only=True)
    payload["scope"] = {**payload["scope"], "threshold": float("nan")}
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(PipelineError, match="scope.threshold"):
        modelfile.load(tmp_path / "nan.pt")


def test_scored_sets_report_the_share_the_model_would_answer(tmp_path):
    from skinlesion.evaluation import evaluate

    target, _ = scoped_model_file(tmp_path)
    predictor = inference.TorchPredictor(*modelfile.load(target))
    pixels = np.concatenate([images(21, 32, seed=3), far_sample()])
    frame = pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(len(pixels))],
                          "lesion_id": [f"HAM_{i:07d}" for i in range(len(pixels))],
                          "label": np.arange(len(pixels)) % 7})
    settings = params.Evaluate(batch_size=16, mel_specificity=0.9, bootstrap_resamples=20, bootstrap_seed=0)
    result = evaluate.evaluate_split(predictor, frame, pixels, settings, metrics_path=tmp_path / "m.json",
                                     plots_dir=None)
    expected = predictor.in_scope(predictor.scope_scores(pixels)).mean()
    assert result["in_scope"] == pytest.approx(expected, abs=1e-4) and 0 < result["in_scope"] < 1


def test_one_pass_over_the_views_gives_what_the_separate_passes_give(tmp_path):
    # The plain view is the first of every TTA: its pooled features give the distance in
    # the same pass as the views' logits, on PyTorch and on ONNX Runtime.
    target, _ = scoped_model_file(tmp_path, members=2)
    model, info = modelfile.load(target)
    pixels = np.concatenate([images(12, 32, seed=5), far_sample()])
    on_torch = inference.TorchPredictor(model, info)
    assert not on_torch.reduced
    logits, probabilities, scores = on_torch.answer(pixels)
    np.testing.assert_array_equal(logits, on_torch.view_logits(pixels, tta=info.scoring.tta))
    np.testing.assert_allclose(scores, on_torch.plain_outputs(pixels)[1], rtol=1e-6)  # a separate plain pass
    export.export(model, info, tmp_path / "model.onnx")
    on_onnx = runtime.OnnxPredictor(*runtime.load(tmp_path / "model.onnx"))
    onnx_logits, onnx_probabilities, onnx_scores = on_onnx.answer(pixels)
    np.testing.assert_array_equal(onnx_logits, on_onnx.view_logits(pixels, tta=info.scoring.tta))
    np.testing.assert_allclose(onnx_scores, on_onnx.plain_outputs(pixels)[1], rtol=1e-6)
    np.testing.assert_allclose(onnx_probabilities, probabilities, atol=1e-4)
    assert float((np.abs(onnx_scores - scores) / np.maximum(scores, 1)).max()) < 1e-3


def test_the_measurement_names_the_kinds_that_pass_as_a_melanoma(tmp_path):
    """Past the out-of-scope score, which kinds of image still raise the melanoma flag:
    counted per kind, and only among the images the score let through."""
    target, _ = scoped_model_file(tmp_path)
    model, info = modelfile.load(target)
    predictor = inference.TorchPredictor(model, info.replace(scoring={**info.scoring.dump(), "mel_threshold": 0.0}))
    inside = images(14, 32, seed=3)
    pictures, kinds = scope_sets.far(32, per_kind=2)
    result, scored = scope_sets.measure(predictor, inside, None, {"far": (pictures, kinds)}, batch_size=8)
    far = result["sets"]["far"]
    passed = scored["far"]["mahalanobis"] <= info.scope.threshold  # every image is flagged at threshold 0
    assert far["melanoma_flag_without_scope"] == 1.0
    assert far["melanoma_flag_by_kind"] == {kind: int(passed[[k == kind for k in kinds]].sum())
                                            for kind in sorted(set(kinds))}
    assert sum(far["melanoma_flag_by_kind"].values()) == pytest.approx(far["melanoma_flag"] * len(kinds), abs=0.01)


def test_scope_compares_the_candidates_on_the_test_scores_evaluate_saved_and_refuses_stale_ones(tmp_path):
    from skinlesion.evaluation import evaluate
    from skinlesion.files import file_digest

    target, _ = scoped_model_file(tmp_path)
    predictor = inference.TorchPredictor(*modelfile.load(target))
    inside = images(21, 32, seed=3)
    frame = pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(21)],
                          "lesion_id": [f"HAM_{i:07d}" for i in range(21)], "label": np.arange(21) % 7})
    settings = params.Evaluate(batch_size=8, mel_specificity=0.9, bootstrap_resamples=10, bootstrap_seed=0)
    saved, digest = tmp_path / "scores" / "scope_scores.npz", file_digest(target)
    evaluate.evaluate_split(predictor, frame, inside, settings, metrics_path=tmp_path / "m.json", plots_dir=None,
                            scores_path=saved, model_digest=digest)
    hint = "run `dvc repro evaluate`"
    found = scope.load_candidates(saved, frame["image_id"], digest, hint)
    assert set(found) == set(scope.METHODS)
    pictures, kinds = scope_sets.far(32, per_kind=1)
    sets = {"far": (pictures, kinds)}
    reused, reused_scores = scope_sets.measure(predictor, inside, None, sets, batch_size=8, inside_scores=found)
    scored, scored_scores = scope_sets.measure(predictor, inside, None, sets, batch_size=8)
    for method in scope.METHODS:  # the same figures as scoring the test split here
        np.testing.assert_allclose(reused_scores["test"][method], scored_scores["test"][method], rtol=1e-6)
    assert reused == scored
    for stale, message in ((lambda: scope.load_candidates(saved, frame["image_id"], "0" * 64, hint), "another model"),
                           (lambda: scope.load_candidates(saved, frame["image_id"][::-1], digest, hint), "order"),
                           (lambda: scope.load_candidates(tmp_path / "none.npz", frame["image_id"], digest, hint),
                            "no such file")):
        with pytest.raises(PipelineError, match=message) as refused:
            stale()
        assert "dvc repro evaluate" in str(refused.value) and "\n" not in str(refused.value)
    (tmp_path / "cut.npz").write_bytes(saved.read_bytes()[:100])
    with pytest.raises(PipelineError, match="not a file of scores"):
        scope.load_candidates(tmp_path / "cut.npz", frame["image_id"], digest, hint)


def test_the_saved_scores_are_the_same_bytes_for_the_same_scores(tmp_path, monkeypatch):
    import time

    found = {"msp": np.array([0.1, 0.2]), "energy": np.array([-3.0, -1.5]), "mahalanobis": np.array([9.0, 2.0])}
    scope.save_candidates(tmp_path / "a.npz", ["ISIC_1", "ISIC_2"], found, "abc")
    monkeypatch.setattr(time, "time", lambda: 1e9)  # written years apart: no time stamp may reach the bytes
    scope.save_candidates(tmp_path / "b.npz", ["ISIC_1", "ISIC_2"], found, "abc")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = scope.load_candidates(tmp_path / "a.npz", ["ISIC_1", "ISIC_2"], "abc", "rerun")
    assert set(loaded) == set(found) and all(np.array_equal(loaded[k], found[k]) for k in found)

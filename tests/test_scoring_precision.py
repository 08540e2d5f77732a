"""Scoring in bf16 (``scoring.precision``): every decision is float32's, because the
answers near one are scored again in float32; the rest move by less than the margin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skinlesion import CLASSES, modelfile
from skinlesion.evaluation import inference
from skinlesion.evaluation.predictor import Predictor
from tests.test_ensemble import saved_members
from tests.test_export import SCORING, images
from tests.test_scope import scoped_model_file

needs_bf16 = pytest.mark.skipif(not inference.scoring_dtype("auto", torch.device("cpu")),
                                reason="this CPU has no native bfloat16")


def predictors(model, info, **scoring):
    """The same network scored in float32 and in bf16 with ``scoring``'s settings."""
    base = {**SCORING, **(info.scoring.dump() if info.scoring else {}), **scoring}
    exact = inference.TorchPredictor(model, info.replace(scoring={**base, "precision": "fp32"}))
    reduced = inference.TorchPredictor(model, info.replace(scoring={**base, "precision": "bf16"}))
    return exact, reduced


def test_the_rows_near_a_decision_are_the_close_top_two_and_the_close_melanoma_ones():
    predictor = Predictor({"architecture": "simple_cnn", "classes": list(CLASSES), "image_size": 32, "mean": [0.5] * 3,
                           "std": [0.25] * 3, "scoring": {"mel_threshold": 0.30, "recheck": 0.05}})
    rows = np.full((4, 7), 0.02)
    rows[0, [5, 6]] = 0.50, 0.38           # clear winner, melanoma far from its threshold
    rows[1, [5, 6]] = 0.44, 0.42           # top two 0.02 apart
    rows[2, [5, 4]] = 0.58, 0.28           # melanoma 0.02 below its threshold
    rows[3, [5, 4]] = 0.60, 0.20
    assert predictor.near_a_decision(rows).tolist() == [False, True, True, False]


def test_fp32_and_a_file_naming_no_precision_score_in_float32():
    model, info = modelfile.load(saved_members_path())
    assert not inference.TorchPredictor(model, info).reduced  # no scoring.precision: float32
    assert not inference.TorchPredictor(model, info.replace(scoring={"precision": "fp32"})).reduced


@needs_bf16
def test_in_bf16_the_answers_near_a_decision_are_float32s_and_the_rest_the_bf16_pass(tmp_path):
    target, _ = scoped_model_file(tmp_path, members=2)
    model, info = modelfile.load(target)
    pixels = images(150, 32, seed=11)
    exact, _ = predictors(model, info)
    want = exact.probabilities(pixels)
    top = np.sort(want, axis=1)
    margin = float(np.median(top[:, -1] - top[:, -2]))  # about half the images are near a decision
    _, reduced = predictors(model, info, recheck=margin)
    assert reduced.reduced and reduced.exact().reduced is False
    _, alone = predictors(model, info, recheck=1e-12)  # no margin: the bf16 pass alone
    bf16 = alone.probabilities(pixels)
    assert 0 < np.abs(bf16 - want).max() < 0.05  # bf16 did run, and stays close
    got = reduced.probabilities(pixels)
    # what the bf16 pass found near a decision: the classes, melanoma, the out-of-scope threshold
    close = reduced.near_a_decision(bf16) | reduced.near_the_scope_threshold(alone.scope_scores(pixels))
    assert 0.2 < close.mean() < 0.8
    np.testing.assert_array_equal(got[close], want[close])
    np.testing.assert_array_equal(got[~close], bf16[~close])
    assert (got.argmax(1) == want.argmax(1)).all()
    assert (exact.melanoma_flags(want) == reduced.melanoma_flags(got)).all()

    # The out-of-scope decision likewise: near the threshold the float32 score decides.
    exact_scores, scores = exact.scope_scores(pixels), reduced.scope_scores(pixels)
    threshold = info.scope.threshold
    near = np.abs(alone.scope_scores(pixels) - threshold) <= margin * max(abs(threshold), 1.0)
    assert near.any()
    _, _, answered = reduced.answer(pixels)  # the one-pass path: the same scores
    np.testing.assert_array_equal(answered[near], exact_scores[near])
    np.testing.assert_array_equal(scores[near], exact_scores[near])
    assert (exact.in_scope(exact_scores) == reduced.in_scope(scores)).all()


def saved_members_path(tmp_path_factory=None):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    return saved_members(folder, 1)[0]

"""Choosing on validation how a model is scored: temperature, logit adjustment,
the melanoma threshold, and the logit-adjusted training loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skinlesion import CLASSES, PipelineError
from skinlesion.evaluation import calibrate
from skinlesion.training import losses

PRIOR = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])


def sample(n: int, seed: int = 0, prior=PRIOR) -> tuple[np.ndarray, np.ndarray]:
    """True logits ``z`` (prior-free class evidence) and labels drawn from
    softmax(z + log prior), i.e. a population with the given class mix."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, len(prior)))
    p = np.exp(z + np.log(prior))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(len(prior), p=row) for row in p])
    return z, labels


def test_logits_scaled_by_three_give_back_a_temperature_near_three():
    z, labels = sample(4000)
    over_confident = 3 * (z + np.log(PRIOR))  # calibrated logits, multiplied by 3
    t = calibrate.fit_temperature(over_confident[None], labels, {"tau": 0.0})
    assert t == pytest.approx(3.0, rel=0.08)
    raw = calibrate.log_loss(over_confident[None], labels, {})
    assert calibrate.log_loss(over_confident[None], labels, {"temperature": t}) < raw


def test_a_calibrated_model_keeps_temperature_one():
    z, labels = sample(4000, seed=1)
    assert calibrate.fit_temperature((z + np.log(PRIOR))[None], labels, {}) == pytest.approx(1.0, rel=0.08)


def test_post_hoc_adjustment_reaches_the_bayes_balanced_rule_and_trades_accuracy_for_it():
    z, labels = sample(20000, seed=2)
    logits = (z + np.log(PRIOR))[None]  # a model that learnt the prior, as plain training does
    prior = np.log(PRIOR).tolist()
    tau, rows = calibrate.fit_tau(logits, labels, prior, "balanced_accuracy")
    # Balanced error is minimised by argmax p(y|x) / P(y), with P(y) the labels' own class shares.
    shares = np.bincount(labels, minlength=7) / len(labels)
    bayes = (z + np.log(PRIOR) - np.log(shares)).argmax(1)
    bayes_balanced = np.mean([(bayes[labels == c] == c).mean() for c in range(7)])
    by_tau = {row["tau"]: row for row in rows}
    assert by_tau[tau]["balanced_accuracy"] == pytest.approx(bayes_balanced, abs=0.01)
    assert by_tau[tau]["balanced_accuracy"] > by_tau[0.0]["balanced_accuracy"] + 0.05
    assert by_tau[tau]["accuracy"] < by_tau[0.0]["accuracy"]  # the trade the objective decides
    tau_mean, _ = calibrate.fit_tau(logits, labels, prior, "mean_accuracy")
    assert 0 < tau_mean < tau
    assert calibrate.fit_tau(logits, labels, prior, "none")[0] == 0.0


def test_melanoma_threshold_reaches_the_target_sensitivity_on_the_images_it_was_chosen_on():
    positive = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], bool)
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.95, 0.35, 0.01])
    threshold = calibrate.threshold_for_sensitivity(positive, score, 0.9)
    assert threshold == 0.1  # 9 of 10 melanomas at or above it; the next one up catches only 8
    assert (score[positive] >= threshold).mean() >= 0.9
    assert calibrate.threshold_for_sensitivity(positive, score, 1.0) == 0.05


def test_fit_writes_a_scoring_that_probabilities_apply():
    z, labels = sample(3000, seed=3)
    views = np.stack([3 * (z + np.log(PRIOR)), 3 * (z + np.log(PRIOR)) + 0.1])
    scoring, report = calibrate.fit(views, labels, labels, tta="flips", adjust="balanced_accuracy",
                                      method="temperature", mel_sensitivity=0.9,
                                      classes=("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"))
    assert scoring["tta"] == "flips" and scoring["tau"] > 0.5 and 2.5 < scoring["temperature"] < 3.5
    assert report["val_after"]["balanced_accuracy"] > report["val_before"]["balanced_accuracy"]
    assert report["val_log_loss_after"] < report["val_log_loss_before"]
    mel = calibrate.probabilities(views, scoring)[:, 4]
    assert (mel[labels == 4] >= scoring["mel_threshold"]).mean() >= 0.9


def test_logit_adjusted_loss_is_cross_entropy_of_the_shifted_logits():
    logits, target = torch.randn(8, 7), torch.arange(8) % 7
    prior = np.arange(1, 8, dtype=float)
    loss = losses.build("cross_entropy", weighted=False, label_smoothing=0.0, gamma=2.0, labels=target.numpy(),
                        num_classes=7, logit_adjust=0.5, prior=prior)
    shifted = logits + 0.5 * torch.log(torch.tensor(prior / prior.sum(), dtype=torch.float32))
    torch.testing.assert_close(loss(logits, target), torch.nn.functional.cross_entropy(shifted, target))
    plain = losses.build("cross_entropy", weighted=False, label_smoothing=0.0, gamma=2.0, labels=target.numpy(),
                         num_classes=7, prior=prior)
    torch.testing.assert_close(plain(logits, target), torch.nn.functional.cross_entropy(logits, target))


def test_logits_scaled_by_three_still_give_three_with_the_adjustment_in_place():
    """A model trained on balanced draws gives prior-free logits; scaled by 3 and adjusted
    back to the population's prior at that scale (tau = -3), the temperature is 3 again."""
    z, labels = sample(4000, seed=2)
    prior = np.log(PRIOR).tolist()
    t = calibrate.fit_temperature((3 * z)[None], labels, {"tau": -3.0, "log_prior": prior})
    assert t == pytest.approx(3.0, rel=0.08)


def test_classwise_ece_sees_the_probabilities_top_label_ece_ignores():
    from skinlesion.evaluation.metrics import classwise_ece, expected_calibration_error

    z, labels = sample(3000, seed=3)
    calibrated = np.exp(z + np.log(PRIOR))
    calibrated /= calibrated.sum(1, keepdims=True)
    # the same top label and top probability, the rest of the mass moved onto one other class
    # (where the top probability is above one half, so the top label stays the top)
    moved = calibrated.copy()
    top = moved.argmax(1)
    rows = np.flatnonzero(moved[np.arange(len(moved)), top] > 0.5)
    rest = 1 - moved[rows, top[rows]]
    moved[rows] = 0
    moved[rows, top[rows]] = 1 - rest
    moved[rows, (top[rows] + 1) % 7] = rest
    assert expected_calibration_error(labels, moved) == pytest.approx(expected_calibration_error(labels, calibrated))
    assert classwise_ece(labels, moved) > 2 * classwise_ece(labels, calibrated)


def with_confident_mistakes(seed: int = 5, n: int = 3000, share: float = 0.02):
    """Calibrated logits, but ``share`` of the images confidently wrong (label noise no
    model can know): log-loss pays so much for them that it asks for a temperature
    above 1, which leaves the rest under-confident."""
    z, labels = sample(n, seed=seed)
    logits = z + np.log(PRIOR)
    rng = np.random.default_rng(seed)
    bad = rng.choice(n, int(share * n), replace=False)
    logits[bad] = 0.0
    logits[bad, (labels[bad] + rng.integers(1, 7, len(bad))) % 7] = 12.0
    return logits, labels


def test_auto_keeps_temperature_scaling_where_it_lowers_the_held_out_ece():
    z, labels = sample(3000, seed=4)
    lesions = (np.arange(len(labels)) // 2).astype(str)  # two images per lesion
    chosen, evidence = calibrate.choose_method((3 * (z + np.log(PRIOR)))[None], labels, lesions, {"tau": 0.0})
    assert chosen == "temperature" and evidence["folds"] == 5
    assert all(t == pytest.approx(3.0, rel=0.1) for t in evidence["fold_temperatures"])
    held = evidence["held_out"]
    assert held["temperature"]["ece"] < held["none"]["ece"] / 3


def test_auto_declines_a_temperature_that_log_loss_wants_but_that_raises_the_ece():
    logits, labels = with_confident_mistakes()
    assert calibrate.fit_temperature(logits[None], labels, {}) > 1.15  # log-loss asks for softer probabilities
    lesions = np.arange(len(labels)).astype(str)
    chosen, evidence = calibrate.choose_method(logits[None], labels, lesions, {"tau": 0.0})
    held = evidence["held_out"]
    assert chosen == "none" and held["temperature"]["ece"] > held["none"]["ece"]
    assert held["temperature"]["log_loss"] < held["none"]["log_loss"]  # what log-loss alone would have chosen
    scoring, report = calibrate.fit(logits[None], labels, labels, tta="none", adjust="none", method="auto",
                                    mel_sensitivity=0.9, classes=CLASSES, lesions=lesions)
    assert scoring["method"] == "none" and scoring["temperature"] == 1.0 and report["method_chosen"] == "none"
    assert calibrate.choose_method(logits[None], labels, np.zeros(len(labels)), {"tau": 0.0})[0] == "none"
    with pytest.raises(PipelineError, match="lesion_id"):
        calibrate.fit(logits[None], labels, labels, tta="none", adjust="none", method="auto", mel_sensitivity=0.9,
                      classes=CLASSES)


def test_reliability_intervals_resample_lesions_not_images():
    """Images of one lesion move together: with ten copies per lesion the accuracy of a
    bin is known far less well than with ten lesions' worth of images."""
    from skinlesion.evaluation import metrics

    z, labels = sample(2000, seed=6)
    probabilities = calibrate.probabilities((z + np.log(PRIOR))[None], {})

    def width(lesions):
        rows = metrics.reliability(labels, probabilities, lesions=lesions, resamples=300, seed=0)
        assert all(r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] for r in rows if r["count"] >= 20)
        return np.mean([r["accuracy_high"] - r["accuracy_low"] for r in rows if r["count"] >= 100])

    copies = np.repeat(np.arange(200), 10)[np.random.default_rng(0).permutation(2000)]
    ordered = np.argsort(copies, kind="stable")
    grouped_labels, grouped = labels.copy(), copies.copy()
    # each lesion's ten images share a label and a confidence: copies of one image
    grouped_probabilities = probabilities.copy()
    for lesion in range(200):
        rows = ordered[lesion * 10:(lesion + 1) * 10]
        grouped_labels[rows], grouped_probabilities[rows] = labels[rows[0]], probabilities[rows[0]]
    labels, probabilities = grouped_labels, grouped_probabilities
    assert width(grouped) > 2 * width(np.arange(2000))
    assert "accuracy_low" not in metrics.reliability(labels, probabilities)[0]

"""Performance by patient group: the groups, their figures equal to the same figures on
the group's images alone, intervals around them, small groups left unscored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skinlesion.evaluation import metrics, subgroups


def scored(n=400, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, n)
    logits = rng.normal(size=(n, 7)) + 2.0 * np.eye(7)[labels] * rng.random((n, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame({
        "image_id": [f"ISIC_{i:07d}" for i in range(n)], "lesion_id": [f"HAM_{i // 2:07d}" for i in range(n)],
        "sex": rng.choice(["male", "female", ""], n, p=[0.5, 0.45, 0.05]),
        "age": rng.choice(["15.0", "35.0", "55.0", "80.0", "", "not a number"], n),
        "localization": rng.choice(["back", "face", "trunk", "acral"], n, p=[0.4, 0.3, 0.27, 0.03]),
        "dx_type": rng.choice(["histo", "follow_up", "consensus"], n)})
    return frame, labels, probabilities


def test_age_bands_and_unknowns():
    bands = subgroups.age_band(pd.Series(["0", "29.9", "30", "49", "50", "69.5", "70", "95", "", "x"]))
    assert bands.tolist() == ["under 30", "under 30", "30-49", "30-49", "50-69", "50-69", "70 and over",
                              "70 and over", "unknown", "unknown"]


def test_each_groups_figures_are_those_of_its_images_alone():
    frame, labels, probabilities = scored()
    table = subgroups.table(frame, labels, probabilities, frame["lesion_id"].to_numpy(), resamples=50, seed=1)
    assert set(table["group"]) == {"sex", "age", "localization", "dx_type"}
    sexes = table[table.group == "sex"].set_index("value")
    assert set(sexes.index) == {"male", "female", "unknown"}
    women = (frame["sex"] == "female").to_numpy()
    direct = metrics.headline(labels[women], probabilities[women])
    assert sexes.loc["female", "images"] == women.sum()
    assert abs(sexes.loc["female", "balanced_accuracy"] - direct["balanced_accuracy"]) < 1e-4
    assert abs(sexes.loc["female", "macro_roc_auc"] - direct["macro_auc"]) < 1e-4
    scored_rows = table[table["balanced_accuracy"].notna()]
    assert (scored_rows["balanced_accuracy_low"] <= scored_rows["balanced_accuracy"] + 1e-9).all()
    assert (scored_rows["balanced_accuracy"] <= scored_rows["balanced_accuracy_high"] + 1e-9).all()
    assert (scored_rows["balanced_accuracy_low"] < scored_rows["balanced_accuracy_high"]).all()


def test_groups_too_small_are_counted_but_not_scored():
    frame, labels, probabilities = scored()
    table = subgroups.table(frame, labels, probabilities, frame["lesion_id"].to_numpy(), resamples=20, seed=1)
    small = table[table["images"] < subgroups.MIN_IMAGES]
    assert len(small) and small["balanced_accuracy"].isna().all()
    assert table[table["images"] >= subgroups.MIN_IMAGES]["balanced_accuracy"].notna().all()


def test_dx_type_joined_from_the_raw_metadata_in_order(tmp_path):
    frame = pd.DataFrame({"image_id": ["b", "a", "c"], "label": [0, 1, 2]})
    pd.DataFrame({"image_id": ["a", "b", "c"], "dx_type": ["histo", "consensus", "follow_up"]}).to_csv(
        tmp_path / "metadata.csv", index=False)
    assert subgroups.with_dx_type(frame, tmp_path / "metadata.csv")["dx_type"].tolist() == [
        "consensus", "histo", "follow_up"]
    pd.DataFrame({"image_id": ["a"]}).to_csv(tmp_path / "bare.csv", index=False)
    assert "dx_type" not in subgroups.with_dx_type(frame, tmp_path / "bare.csv")


def test_a_group_built_to_be_worse_is_flagged_and_melanoma_sensitivity_reported():
    frame, labels, probabilities = scored(600, seed=2)
    women = (frame["sex"] == "female").to_numpy()
    spoiled = probabilities.copy()
    rng = np.random.default_rng(5)
    spoiled[women] = rng.dirichlet(np.ones(7), women.sum())  # the model knows nothing about this group
    table = subgroups.table(frame, labels, spoiled, frame["lesion_id"].to_numpy(), resamples=100, seed=1,
                            mel_threshold=0.3)
    sexes = table[table.group == "sex"].set_index("value")
    assert bool(sexes.loc["female", "below_overall"]) and not bool(sexes.loc["male", "below_overall"])
    mel = 4
    men = (frame["sex"] == "male").to_numpy() & (labels == mel)
    assert sexes.loc["male", "melanomas"] == men.sum()
    assert sexes.loc["male", "melanoma_sensitivity"] == pytest.approx((spoiled[men, mel] >= 0.3).mean(), abs=1e-4)
    assert sexes.loc["male", "melanoma_sensitivity_low"] <= sexes.loc["male", "melanoma_sensitivity"]


def test_the_card_shows_the_groups_flags_the_worse_one_and_says_when_calibration_does_not_help():
    from skinlesion.evaluation import card

    frame, labels, probabilities = scored(600, seed=2)
    women = (frame["sex"] == "female").to_numpy()
    spoiled = probabilities.copy()
    spoiled[women] = np.random.default_rng(5).dirichlet(np.ones(7), women.sum())
    groups = subgroups.table(frame, labels, spoiled, frame["lesion_id"].to_numpy(), resamples=50, seed=1)
    info = {"architecture": "resnet18", "settings": {}, "head": None, "classes": ["akiec", "bcc"], "image_size": 64,
            "mean": [0.5] * 3, "std": [0.2] * 3, "scope": {"method": "mahalanobis", "threshold": 812.5,
                                                          "retention": 0.95}}
    test = {"balanced_accuracy": 0.6, "accuracy": 0.7, "macro_f1": 0.5, "macro_roc_auc": 0.9, "images": 600,
            "lesions": 300, "recall": {c: 0.5 for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")},
            "expected_calibration_error": 0.04,
            "calibration": {"ece_before": 0.03, "ece_after": 0.04, "difference": 0.01,
                            "ci95": {"low": 0.002, "high": 0.02}, "verdict": "hurts"}}
    text = card.render(info, {}, test, None, groups)
    assert "| sex: female **below the overall figure** |" in text and "| sex: male |" in text
    assert "Skin type (Fitzpatrick) is not recorded in HAM10000" in text
    assert "it does **not** help on the test split" in text
    assert "above 812.5" in text and "no melanoma flag" in text


def test_the_card_says_when_validation_chose_no_temperature():
    from skinlesion.evaluation import card

    info = {"architecture": "resnet18", "settings": {}, "head": None, "classes": ["akiec", "bcc"], "image_size": 64,
            "mean": [0.5] * 3, "std": [0.2] * 3}
    test = {"balanced_accuracy": 0.6, "accuracy": 0.7, "macro_f1": 0.5, "macro_roc_auc": 0.9, "images": 600,
            "lesions": 300, "recall": {c: 0.5 for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")},
            "expected_calibration_error": 0.031,
            "calibration": {"ece_before": 0.031, "ece_after": 0.031, "difference": 0.0, "ci95": {"low": 0, "high": 0},
                            "verdict": "no measurable change", "ece_after_ci95": {"low": 0.022, "high": 0.041},
                            "classwise_ece_after": 0.012}}
    declined = card.render({**info, "scoring": {"method": "none", "temperature": 1.0}}, {}, test, None, None)
    assert "Calibration: none (validation chose it" in declined
    assert "No temperature scaling (validation chose none). Top-label ECE on the test split 0.031 [0.022, 0.041]" in declined
    assert "Temperature scaling (chosen on validation)" not in declined
    kept = card.render({**info, "scoring": {"method": "temperature", "temperature": 1.3}}, {}, test, None, None)
    assert "Calibration: temperature scaling, T = 1.300" in kept and "Temperature scaling (chosen on validation)" in kept

"""The model card: what the model is, what it was trained and tested on, how well it
did (with intervals), how it is calibrated and thresholded, and what it is not for.
Generated from the metrics the pipeline wrote, so it cannot disagree with them."""

from __future__ import annotations

from pathlib import Path

from skinlesion import CLASSES
from skinlesion.evaluation.subgroups import MIN_IMAGES
from skinlesion.files import atomic_path
from skinlesion.modelinfo import ModelInfo, Scoring, described


def _ci(value: float, interval: dict | None) -> str:
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def _head(description) -> dict | None:
    return None if description.head is None else description.head.model_dump()


def _architecture(info: ModelInfo) -> list[str]:
    if not info.is_ensemble:
        return [f"- Architecture: `{info.architecture}`, settings `{info.settings}`, head `{_head(info)}`"]
    lines = [f"- An ensemble of {len(info.members)} members, their {info.settings['combine']} averaged "
             f"(each member sees every test-time view):"]
    for index, member in enumerate(info.members):
        lines.append(f"  {index + 1}. `{member.architecture}`, settings `{member.settings}`, head "
                     f"`{_head(member)}`; epoch kept {member.training.get('epoch', '?')} (chosen on validation)")
    return lines


def render(info: ModelInfo | dict, split: dict, test: dict, external: dict[str, dict] | None = None,
           groups=None) -> str:
    info = described(info)
    scoring = info.scoring or Scoring()
    lines = [
        f"# Model card: {info.architecture} for HAM10000 skin-lesion classification", "",
        "**Intended use: research and teaching, not a diagnosis.** It must not be used to decide the care of a "
        "patient. It has seen only dermatoscopic images from the HAM10000 collection.", "",
        "## Model", "",
        *_architecture(info),
        f"- Input: {info.image_size} x {info.image_size} RGB (HAM10000's 4:3 frames squashed, not cropped), "
        f"normalised with mean {info.mean} and std {info.std}",
        f"- Classes, in output order: {', '.join(info.classes)}",
        *([f"- Also takes the patient's age, sex and body site (sexes {', '.join(info.patient.sex)}; sites "
           f"{', '.join(info.patient.localization)}; each may be blank or unknown, which has its own encoding): "
           f"prediction needs them (`--metadata` CSV, or the page's form)"] if info.patient is not None else []),
        *([] if info.is_ensemble else
          [f"- Epoch kept: {info.training.get('epoch', '?')} (chosen on the validation split)"]), "",
        "## How it is scored (chosen on the validation split)", "",
        f"- Test-time augmentation: `{scoring.tta}` (softmax averaged over the views)",
        f"- Post-hoc logit adjustment: tau = {scoring.tau:g} (logits - tau * log(train class prior))",
        _temperature(scoring),
    ]
    if scoring.mel_threshold is not None:
        lines.append(f"- Melanoma flag: probability of mel >= {scoring.mel_threshold:.4f}")
    return "\n".join(lines + _scope(info) + _data(split) + _results(test) + _calibration(test, scoring) + _groups(groups)
                     + _external(external) + LIMITATIONS)


def _scope(info: ModelInfo) -> list[str]:
    scope = info.scope
    if scope is None:
        return ["- Out-of-scope score: none; every image gets an answer, however unlike the training data"]
    measured = ""
    if scope.method == "mahalanobis":
        measured = (" of the pooled features of the backbone's stages" if scope.features == "stages"
                    else " of the last stage's pooled features")
    return [f"- Out-of-scope score: `{scope.method}`{measured}; an image scoring above {scope.threshold:.4g} (the "
            f"threshold that keeps {scope.retention:.0%} of the validation images) gets no diagnosis and no "
            f"melanoma flag: \"this does not look like the dermatoscopic images the model was trained on\""]


def _temperature(scoring: Scoring) -> str:
    if scoring.method == "none":
        return ("- Calibration: none (validation chose it: temperature scaling did not lower the ECE of the "
                "validation lesions held out from its fit)")
    return f"- Calibration: temperature scaling, T = {scoring.temperature:.3f}"


def _calibration(test: dict, scoring: Scoring) -> list[str]:
    change = test.get("calibration")
    if not change:
        return []
    if scoring.method == "none":
        return ["", f"No temperature scaling (validation chose none). Top-label ECE on the test split "
                    f"{test['expected_calibration_error']:.3f} [{change['ece_after_ci95']['low']:.3f}, "
                    f"{change['ece_after_ci95']['high']:.3f}], class-wise ECE {change['classwise_ece_after']:.3f}."]
    ci = change["ci95"]
    said = {"helps": "it helps on the test split", "hurts": "it does **not** help on the test split: ECE rose",
            "no measurable change": "no measurable change on the test split"}[change["verdict"]]
    lines = ["", f"Temperature scaling (chosen on validation): top-label ECE {change['ece_before']:.3f} before, "
                 f"{change['ece_after']:.3f} after, difference {change['difference']:+.3f} [{ci['low']:+.3f}, "
                 f"{ci['high']:+.3f}] (paired lesion bootstrap): {said}."]
    if "classwise_ece_before" in change:
        wise = change["classwise_difference_ci95"]
        lines[-1] += (f" Class-wise ECE {change['classwise_ece_before']:.3f} before, {change['classwise_ece_after']:.3f}"
                      f" after (difference interval [{wise['low']:+.3f}, {wise['high']:+.3f}]).")
    return lines


def _cell(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None or value != value:  # blank or NaN: not scored
        return "—"
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low == low and high == high else f"{value:.3f}"


def _groups(groups) -> list[str]:
    if groups is None or not len(groups):
        return []
    lines = ["", "## By patient group (test split; 95 % lesion-bootstrap intervals)", "",
             "| group | images | balanced accuracy | macro ROC AUC | melanoma sensitivity |", "|---|---|---|---|---|"]
    for row in groups.to_dict("records"):
        flag = " **below the overall figure**" if row.get("below_overall") is True else ""
        lines.append(f"| {row['group']}: {row['value']}{flag} | {row['images']} | {_cell(row, 'balanced_accuracy')} | "
                     f"{_cell(row, 'macro_roc_auc')} | {_cell(row, 'melanoma_sensitivity')} |")
    lines += ["", f"Groups of fewer than {MIN_IMAGES} images are counted, not scored. A group is flagged when its "
                  f"whole balanced-accuracy interval lies below the figure of all test images. Skin type "
                  f"(Fitzpatrick) is not recorded in HAM10000, so performance by skin type could not be assessed; "
                  f"nor could ethnicity or the camera."]
    return lines


def _data(split: dict) -> list[str]:
    lines = ["", "## Data", ""]
    shared = split.get("shared_lesions", {})
    lines.append(f"Split by {'lesion (no lesion on two sides)' if not any(shared.values()) else 'IMAGE: THIS SPLIT LEAKS'}; "
                 f"lesions shared between splits: {shared}.")
    lines += ["", "| split | images | lesions | " + " | ".join(CLASSES) + " |",
              "|---|---|---|" + "---|" * len(CLASSES)]
    for name in ("train", "val", "test"):
        if name in split:
            part = split[name]
            lines.append(f"| {name} | {part['images']} | {part['lesions']} | "
                         + " | ".join(str(part['classes'].get(c, 0)) for c in CLASSES) + " |")
    return lines


def _results(test: dict) -> list[str]:
    ci = test.get("ci95", {})
    lines = ["", "## Results on the test split (touched once; 95 % intervals from resampling lesions)", "",
              "| figure | value [95 % interval] |", "|---|---|"]
    for key, label in (("balanced_accuracy", "balanced accuracy (headline)"), ("accuracy", "accuracy"),
                       ("macro_f1", "macro-F1"), ("macro_roc_auc", "macro ROC AUC")):
        lines.append(f"| {label} | {_ci(test[key], ci.get(key))} |")
    for name in CLASSES:
        lines.append(f"| recall {name} | {_ci(test['recall'][name], ci.get('recall', {}).get(name))} |")
    lines.append(f"| expected calibration error | {test['expected_calibration_error']:.3f}"
                 + (f" (before temperature scaling {test['expected_calibration_error_uncalibrated']:.3f})"
                    if "expected_calibration_error_uncalibrated" in test else "") + " |")
    if "melanoma" in test:
        mel = test["melanoma"]
        lines.append(f"| melanoma sensitivity at the validation threshold | "
                     f"{_ci(mel['sensitivity'], ci.get('melanoma_sensitivity'))} |")
        lines.append(f"| melanoma specificity at the validation threshold | "
                     f"{_ci(mel['specificity'], ci.get('melanoma_specificity'))} |")
    lines.append(f"\n{test['images']} test images of {test['lesions']} lesions.")
    return lines


def _external(external: dict[str, dict] | None) -> list[str]:
    lines = []
    if external:
        lines += ["", "## External sets", "", "| set | images | balanced accuracy | accuracy | macro ROC AUC |",
                  "|---|---|---|---|---|"]
        for name, figures in external.items():
            eci = figures.get("ci95", {})
            lines.append(f"| {name} | {figures['images']} | {_ci(figures['balanced_accuracy'], eci.get('balanced_accuracy'))}"
                         f" | {_ci(figures['accuracy'], eci.get('accuracy'))} | "
                         f"{_ci(figures['macro_roc_auc'], eci.get('macro_roc_auc'))} |")
        for name, figures in external.items():
            shared = (figures.get("shared_with_own_data") or {}).get("images", 0)
            if shared:
                lines.append(f"\n**{name} is not an external test**: {shared} of its {figures['images']} images are "
                             f"the data this model was built from (same image, lesion or pixels).")
    return lines


LIMITATIONS = [
    "", "## Known limitations", "",
    "- Trained from scratch on a few thousand images of one collection (Vienna and Queensland clinics); "
    "expect lower figures on other cameras, clinics and skin types.",
    "- The rare classes have a dozen or two test images (see the table above): their recall intervals are wide.",
    "- Inputs are squashed to a square at a low resolution; fine structure below that scale is lost.",
    "- Probabilities are calibrated on the validation split's class mix; a population with other "
    "class shares needs its own calibration.", ""]


def write(path: Path, info: ModelInfo, split: dict, test: dict, external: dict[str, dict] | None = None,
          groups=None) -> None:
    """``groups``: the test split's figures by patient group (``subgroups.table``), or None."""
    with atomic_path(path) as tmp:
        tmp.write_text(render(info, split, test, external, groups), encoding="utf-8")

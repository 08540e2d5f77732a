"""DVC stage `scope`: how well the out-of-scope score tells far images (photographs,
generated patterns) and near ones (the test lesions made unusable) from the test split's
lesions, for every candidate score; none of these images was seen by training or by
the threshold (skinlesion.evaluation.scope_sets)."""

import logging
from pathlib import Path

import numpy as np

from skinlesion import modelfile, plots
from skinlesion.cli import run_stage
from skinlesion.data.prepare import Prepared
from skinlesion.data.split import read_manifest
from skinlesion.evaluation import inference, scope, scope_sets
from skinlesion.files import atomic_dir, file_digest, write_json

MODEL = Path("models/model.pt")
SCOPE_SCORES = Path("data/evaluate/scope_scores.npz")  # the evaluate stage's scores of the test split


def main(params):
    settings = params.scope
    model, info = modelfile.load(MODEL)
    device = inference.scoring_device()
    prepared = Prepared("data/prepared")
    predictor = inference.TorchPredictor(model, info, device)
    if getattr(model, "scope", None) is None:  # the Mahalanobis candidate, for the comparison, fitted on train
        train = read_manifest("data/split/train.csv")
        inference.attach_mahalanobis(predictor, (prepared.images[prepared.rows(train["image_id"])],
                                                 train["label"].to_numpy(), predictor.patient_rows(train)),
                                     settings.batch_size)
    test = read_manifest("data/split/test.csv")
    rows = prepared.rows(test["image_id"])
    images = prepared.images[rows]
    has_mask = prepared.index["has_mask"].to_numpy()[rows].astype(bool)
    sets = {"far": scope_sets.far(info.image_size, settings.per_kind, settings.seed),
            "near": scope_sets.near(images, prepared.masks[rows], has_mask, settings.per_kind, settings.seed)}
    # A model carrying the Mahalanobis score was scored on the test split by evaluate, every
    # candidate included; for one that carries another, the candidate is fitted here, so score it.
    inside = None if predictor.scope_method != "mahalanobis" else scope.load_candidates(
        SCOPE_SCORES, test["image_id"], file_digest(MODEL),
        hint="run `dvc repro evaluate` (or `dvc repro scope`, which runs it first)")
    result, scored = scope_sets.measure(predictor, images, predictor.patient_rows(test), sets,
                                        batch_size=settings.batch_size, inside_scores=inside)
    write_json(Path("metrics/scope.json"), result, sort_keys=False)
    with atomic_dir(Path("plots/scope")) as out:
        plots.score_histograms(scored, result.get("method"), result.get("threshold"), out / "scores.png")
        for name, (pictures, kinds) in sets.items():
            method = result.get("method") or "mahalanobis"
            values = scored[name][method]
            order = np.argsort([kinds.index(kind) for kind in kinds], kind="stable")[::max(1, len(kinds) // 24)]
            captions = [f"{kinds[i]}\n{method} {values[i]:.3g}" for i in order]
            colours = ["darkgreen" if result.get("threshold") is not None and values[i] > result["threshold"]
                       else "red" for i in order]
            plots.image_grid(pictures[order], captions, colours, out / f"{name}.png", columns=6)
    for name, figures in result["sets"].items():
        logging.info("%s (%d images): %s", name, figures["msp"]["images"], "; ".join(
            f"{method} AUROC {figures[method]['auroc']:.3f}, FPR at 95 %% {figures[method]['fpr_at_95']:.3f}"
            .replace("%%", "%") for method in ("msp", "energy", "mahalanobis")))
    if result.get("method"):
        logging.info("at the model's %s threshold: %.1f%% of test lesions kept; caught %s", result["method"],
                     100 * result["test_kept"], ", ".join(f"{name} {100 * figures[result['method']]['caught']:.0f}%"
                                                           for name, figures in result["sets"].items()))


if __name__ == "__main__":
    run_stage("scope", main)

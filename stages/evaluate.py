"""DVC stage `evaluate`: score the calibrated model once on the test split, with 95 %
lesion-bootstrap intervals (skinlesion.evaluation.evaluate)."""

import logging
from pathlib import Path

from skinlesion import modelfile
from skinlesion.cli import run_stage
from skinlesion.data.prepare import Prepared
from skinlesion.data.split import read_manifest
from skinlesion.evaluation import evaluate, inference, subgroups
from skinlesion.files import file_digest

MODEL = Path("models/model.pt")
# Every out-of-scope candidate's scores of the test split, from this stage's one scoring
# of it: the scope stage compares the candidates on them instead of scoring it again.
SCOPE_SCORES = Path("data/evaluate/scope_scores.npz")


def main(params):
    settings = params.evaluate
    model, info = modelfile.load(MODEL)
    device = inference.scoring_device()
    test = read_manifest("data/split/test.csv")
    test = subgroups.with_dx_type(test, Path("data/raw/metadata.csv"))  # for the figures by diagnosis method
    prepared = Prepared("data/prepared")
    images = prepared.images[prepared.rows(test["image_id"])]
    predictor = inference.TorchPredictor(model, info, device)
    result = evaluate.evaluate_split(predictor, test, images, settings,
                                     metrics_path=Path("metrics/evaluate.json"), plots_dir=Path("plots/evaluate"),
                                     progress="evaluate", scores_path=SCOPE_SCORES,
                                     model_digest=file_digest(MODEL))
    ci = result["ci95"]
    logging.info("test (%d images, %d lesions; 95%% lesion-bootstrap intervals): balanced accuracy %.3f [%.3f, %.3f], "
                 "accuracy %.3f [%.3f, %.3f], macro F1 %.3f, macro ROC AUC %.3f [%.3f, %.3f]", result["images"],
                 result["lesions"], result["balanced_accuracy"], ci["balanced_accuracy"]["low"],
                 ci["balanced_accuracy"]["high"], result["accuracy"], ci["accuracy"]["low"], ci["accuracy"]["high"],
                 result["macro_f1"], result["macro_roc_auc"], ci["macro_roc_auc"]["low"], ci["macro_roc_auc"]["high"])
    change = result.get("calibration")
    if change:
        logging.info("temperature scaling on the test split: ECE %.3f -> %.3f, difference %+.3f [%+.3f, %+.3f]: %s",
                     change["ece_before"], change["ece_after"], change["difference"], change["ci95"]["low"],
                     change["ci95"]["high"], change["verdict"])


if __name__ == "__main__":
    run_stage("evaluate", main)

"""DVC stage `calibrate`: choose on validation how the trained model is scored (TTA,
logit adjustment, temperature, melanoma threshold) and write it into the model file
(skinlesion.calibration)."""

import logging
from pathlib import Path

import pandas as pd

from skinlesion import modelfile
from skinlesion.cli import run_stage
from skinlesion.data.prepare import Prepared
from skinlesion.evaluation import calibrate, inference
from skinlesion.files import write_json


def main(params):
    settings = params["calibrate"]
    trained = Path("models/trained.pt")
    model, info = modelfile.load(trained)
    device = inference.scoring_device()
    val = pd.read_csv("data/split/val.csv", dtype={"image_id": str, "lesion_id": str})
    train = pd.read_csv("data/split/train.csv", dtype={"image_id": str, "lesion_id": str})
    prepared = Prepared("data/prepared")
    images = prepared.images[prepared.rows(val["image_id"])]
    predictor = inference.TorchPredictor(model, info, device)
    logits = predictor.view_logits(images, tta=settings["tta"], batch_size=settings["batch_size"],
                                   progress="calibrate", patient=predictor.patient_rows(val))
    scoring, report = calibrate.fit(logits, val["label"].to_numpy(), train["label"].to_numpy(),
                                      tta=settings["tta"], adjust=settings["adjust"], method=settings["method"],
                                      mel_sensitivity=settings["mel_sensitivity"], classes=info["classes"])
    modelfile.with_scoring(trained, Path("models/model.pt"), scoring)
    write_json(Path("plots/calibrate/calibration.json"), report)
    before, after = report["val_before"], report["val_after"]
    logging.info("validation: tau %.2f, temperature %.2f, melanoma threshold %.3f; balanced accuracy %.3f -> %.3f, "
                 "accuracy %.3f -> %.3f, log-loss %.3f -> %.3f", scoring["tau"], scoring["temperature"],
                 scoring["mel_threshold"], before["balanced_accuracy"], after["balanced_accuracy"],
                 before["accuracy"], after["accuracy"], report["val_log_loss_before"], report["val_log_loss_after"])


if __name__ == "__main__":
    run_stage("calibrate", main)

"""DVC stage `calibrate`: combine the members of ``ensemble.seeds`` into one model and
choose on validation how it is scored (TTA, logit adjustment, temperature, melanoma
threshold; the precision is a param) and past what out-of-scope score it declines to
answer (the score's class means and covariance fitted on the train split); write it as
``models/model.pt`` (skinlesion.evaluation.calibrate, skinlesion.evaluation.scope)."""

import logging
from pathlib import Path

import pandas as pd

from skinlesion import modelfile
from skinlesion.cli import run_stage
from skinlesion.data.prepare import Prepared
from skinlesion.data.split import read_manifest
from skinlesion.evaluation import calibrate, inference
from skinlesion.files import write_csv, write_json


def main(params):
    settings, ensemble = params.calibrate, params.ensemble
    members = [Path(f"models/members/{seed}.pt") for seed in ensemble.seeds]
    device = inference.scoring_device()
    model, info = modelfile.load_members(members, ensemble.combine, device)
    val = read_manifest("data/split/val.csv")
    train = read_manifest("data/split/train.csv")
    prepared = Prepared("data/prepared")
    images = prepared.images[prepared.rows(val["image_id"])]
    # Every choice made on validation is made on float32 scores; the precision applies after.
    predictor = inference.TorchPredictor(model, info.replace(scoring={"precision": "fp32"}), device)
    logits = predictor.view_logits(images, tta=settings.tta, batch_size=settings.batch_size,
                                   progress="calibrate", patient=predictor.patient_rows(val))
    scoring, report = calibrate.fit(logits, val["label"].to_numpy(), train["label"].to_numpy(),
                                      tta=settings.tta, adjust=settings.adjust, method=settings.method,
                                      mel_sensitivity=settings.mel_sensitivity, classes=info.classes,
                                      lesions=val["lesion_id"].to_numpy())
    scoring = {**scoring, "precision": settings.precision, "recheck": settings.recheck}
    train_images = prepared.images[prepared.rows(train["image_id"])]
    scored = inference.TorchPredictor(model, info.replace(scoring=scoring), device)
    scope, scope_state = inference.fit_scope(
        scored, settings.scope, settings.scope_retention, features=settings.scope_features,
        batch_size=settings.batch_size,
        train=(train_images, train["label"].to_numpy(), predictor.patient_rows(train)),
        val=(images, predictor.patient_rows(val)),
        val_probabilities=calibrate.probabilities(logits, scoring))
    modelfile.save_ensemble(members, Path("models/model.pt"), ensemble.combine, scoring, scope, scope_state)
    search = report.pop("tau_search")
    write_json(Path("metrics/calibrate.json"), {"members": len(members), "combine": ensemble.combine, **report,
                                                "scope": scope}, sort_keys=False)
    write_csv(Path("plots/calibrate/tau_search.csv"), pd.DataFrame(search))
    before, after = report["val_before"], report["val_after"]
    chosen = report.get("method_selection")
    if chosen and chosen["held_out"]:
        held = chosen["held_out"]
        logging.info("calibration chosen on validation: %s (held-out top-label ECE %.4f with temperature scaling, "
                     "%.4f without)", chosen["chosen"], held["temperature"]["ece"], held["none"]["ece"])
    logging.info("%d member(s); validation: tau %.2f, temperature %.2f, melanoma threshold %.3f; balanced accuracy "
                 "%.3f -> %.3f, accuracy %.3f -> %.3f, log-loss %.3f -> %.3f", len(members), scoring["tau"],
                 scoring["temperature"], scoring["mel_threshold"], before["balanced_accuracy"],
                 after["balanced_accuracy"], before["accuracy"], after["accuracy"], report["val_log_loss_before"],
                 report["val_log_loss_after"])


if __name__ == "__main__":
    run_stage("calibrate", main)

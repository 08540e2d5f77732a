"""DVC stage `evaluate`: score the trained model once on the test split (skinlesion.metrics)."""

import logging
from pathlib import Path

import pandas as pd

from skinlesion import modelfile
from skinlesion.evaluation import evaluate, inference, metrics
from skinlesion.cli import run_stage
from skinlesion.files import write_json
from skinlesion.data.prepare import Prepared


def main(params):
    settings = params["evaluate"]
    model, info = modelfile.load(Path("models/model.pt"))
    test = pd.read_csv("data/split/test.csv", dtype={"image_id": str, "lesion_id": str})
    prepared = Prepared("data/prepared")
    images = prepared.images[prepared.rows(test["image_id"])]
    probabilities = inference.predict(model, info, images, batch_size=settings["batch_size"], progress="evaluate")
    result = metrics.evaluate(test["label"].to_numpy(), probabilities, mel_specificity=settings["mel_specificity"],
                              mel_threshold=inference.scoring(info).get("mel_threshold"))
    write_json(Path("metrics/evaluate.json"), result)
    evaluate.write_plots(Path("plots/evaluate"), test, probabilities, images, settings["grid_per_class"],
                           settings["seed"])
    logging.info("test: balanced accuracy %.3f, accuracy %.3f, macro F1 %.3f, macro ROC AUC %.3f (%d images)",
                 result["balanced_accuracy"], result["accuracy"], result["macro_f1"], result["macro_roc_auc"],
                 result["images"])


if __name__ == "__main__":
    run_stage("evaluate", main)

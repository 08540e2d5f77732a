"""DVC stage `external`: score the model on each labelled set listed in
`external.sources` (folders or zips in HAM10000 layout, or the ISIC 2018 Task 3
test set, downloaded), with the test split's
metrics, intervals and plots (skinlesion.evaluation.external). An empty list is
the default and costs nothing."""

import logging
from pathlib import Path

from skinlesion import modelfile
from skinlesion.cli import run_stage
from skinlesion.evaluation import external
from skinlesion.files import atomic_dir, write_json


def main(params):
    listed = external.check_sources(params.external.sources)
    results = {}
    with atomic_dir(Path("plots/external")) as plots:
        # never an empty folder: git keeps no empty folders, so a clone would miss this output
        write_json(plots / "sources.json", [entry.model_dump() for entry in listed])
        if listed:
            model, info = modelfile.load(Path("models/model.pt"))
            sources = [external.locate(entry, params.external) for entry in listed]
            own = external.OwnData.of(Path("data/prepared"))
            results = external.score_sources(model, info, sources, params.evaluate, plots, own)
    write_json(Path("metrics/external.json"), results, sort_keys=False)
    for name, result in results.items():
        logging.info("%s (%d images): balanced accuracy %.3f, accuracy %.3f, macro ROC AUC %.3f", name,
                     result["images"], result["balanced_accuracy"], result["accuracy"], result["macro_roc_auc"])
    if not results:
        logging.info("no external sets listed (external.sources)")


if __name__ == "__main__":
    run_stage("external", main)

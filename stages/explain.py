"""DVC stage `explain`: Grad-CAM on the test split, measured against lesion masks, for
the class the evaluate stage predicted for each image (skinlesion.evaluation.explain)."""

import logging
from pathlib import Path

import numpy as np

from skinlesion import CLASSES, modelfile
from skinlesion.cli import run_stage
from skinlesion.data.prepare import Prepared
from skinlesion.data.split import read_manifest
from skinlesion.evaluation import explain, inference, predictor
from skinlesion.files import atomic_dir, write_json

# The classes the evaluate stage predicted for the test split: the heat maps explain them,
# and the test split is not scored with every view a second time.
PREDICTIONS = Path("plots/evaluate/predictions.csv")


def main(params):
    settings = params.explain
    model, info = modelfile.load(Path("models/model.pt"))
    device = inference.scoring_device()
    test = read_manifest("data/split/test.csv")
    prepared = Prepared("data/prepared")
    rows = prepared.rows(test["image_id"])
    images, masks = prepared.images[rows], prepared.masks[rows]
    has_mask = prepared.index["has_mask"].to_numpy()[rows].astype(bool)
    labels = test["label"].to_numpy()
    rng = np.random.default_rng(settings.seed)
    shown = {name: sorted(rng.choice(np.flatnonzero(labels == i), min(settings.per_class, (labels == i).sum()),
                                     replace=False).tolist()) for i, name in enumerate(CLASSES)}
    scored, cams = explain.score_split(model.to(device), info, images, masks, has_mask, method=settings.method,
                                            batch_size=settings.batch_size, device=device,
                                            patient=predictor.patient_rows(info, test),
                                            keep={i for chosen in shown.values() for i in chosen}, progress="explain",
                                            predicted=explain.predicted_classes(PREDICTIONS, test["image_id"],
                                                                                info.classes))
    summary = explain.summarise(scored, labels, CLASSES)
    # The metric people compare is the overall figure; the per-class break-down sits with the plots.
    layer = scored[0]["layer"] if scored else None
    write_json(Path("metrics/explain.json"), {"method": settings.method, "layer": layer, **summary["overall"]},
               sort_keys=False)
    with atomic_dir(Path("plots/explain")) as out:
        write_json(out / "per_class.json", summary["per_class"])
        explain.gallery(out, shown, images=images, masks=masks, has_mask=has_mask, image_ids=test["image_id"],
                        scored=scored, cams=cams)
    overall = summary["overall"]
    logging.info("%s (at %s) on %d test images with masks: %.0f%% of heat-map energy on the lesion, "
                 "pointing game %.0f%%", settings.method, layer, overall["images"],
                 100 * overall.get("energy_in_lesion", float("nan")), 100 * overall.get("pointing_game", float("nan")))


if __name__ == "__main__":
    run_stage("explain", main)

"""DVC stage `balance`: rebalance the train split on disk (skinlesion.data.balance)."""

import logging
from pathlib import Path

from skinlesion import plots
from skinlesion.cli import run_stage
from skinlesion.data import balance
from skinlesion.data.prepare import Prepared
from skinlesion.data.split import read_manifest
from skinlesion.files import atomic_dir, write_csv, write_json, write_npy


def main(params):
    settings = params.balance
    train = read_manifest("data/split/train.csv")
    prepared = Prepared("data/prepared")
    planned = balance.plan(train, settings.strategy, settings.target_per_class, settings.seed)
    rows = prepared.rows(planned["image_id"])
    images = balance.render(planned, prepared.images, rows, settings.augment, settings.seed)
    with atomic_dir(Path("data/balanced")) as building:
        write_npy(building / "images.npy", images)
        write_csv(building / "train.csv", planned)
    summary = balance.summary(train, planned, settings.strategy)
    write_json(Path("plots/balance/summary.json"), summary)
    originals = {image_id: prepared.images[row] for image_id, row in zip(planned["image_id"], rows)}
    plots.montage(images, planned, originals, Path("plots/balance/augmented_montage.png"),
                  settings.montage_per_class)
    logging.info("balanced train: %d images, per class %s", summary["images"], summary["after"])


if __name__ == "__main__":
    run_stage("balance", main)

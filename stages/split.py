"""DVC stage `split`: lesion-grouped, stratified train/val/test manifests (skinlesion.data.split)."""

import logging
from pathlib import Path

from skinlesion import plots
from skinlesion.cli import run_stage
from skinlesion.data import metadata, split
from skinlesion.files import atomic_dir, write_csv, write_json


def main(params):
    settings = params.split
    frame = metadata.read(Path("data/raw/metadata.csv"))
    manifests = split.split(frame, settings.val_fraction, settings.test_fraction, settings.seed,
                            settings.group_by)
    with atomic_dir(Path("data/split")) as building:
        for name, manifest in manifests.items():
            write_csv(building / f"{name}.csv", manifest)
    summary = split.summary(manifests)
    write_json(Path("plots/split/summary.json"), summary)
    plots.class_distribution({name: summary[name]["classes"] for name in split.SPLITS},
                             Path("plots/split/class_distribution.png"),
                             f"Images per class in each split ({settings.group_by}-grouped)")
    for name in split.SPLITS:
        logging.info("%-5s %5d images, %5d lesions", name, summary[name]["images"], summary[name]["lesions"])
    logging.info("lesions shared between splits: %s", summary["shared_lesions"])
    if settings.group_by == "image":
        logging.warning("WARNING: split.group_by is 'image': %d lesions have images on more than one side. This "
                        "split LEAKS and every score measured on it is inflated; use it only to measure the leak "
                        "(split.group_by: lesion is the honest split)", split.leaking_lesions(manifests))


if __name__ == "__main__":
    run_stage("split", main)

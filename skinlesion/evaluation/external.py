"""Labelled sets from elsewhere, scored like the test split: any folder or zip in
HAM10000 layout (metadata CSV, images, optional masks), or the ISIC 2018 Task 3 test
set downloaded with its public ground truth (the DermaMNIST-E protocol: train on
HAM10000, test on ISIC 2018), decoded exactly as the pipeline decodes, with the same
headline metrics, intervals and plots."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import requests

from skinlesion import CLASSES, PipelineError
from skinlesion.data import archives, assemble, isic2018
from skinlesion.evaluation import evaluate, inference

log = logging.getLogger(__name__)
MAX_BYTES = 64 * 2**30


@dataclass
class Source:
    """Where one external set's files are, and its labels when they are not a HAM10000 CSV."""
    name: str
    paths: list[Path]
    metadata: pd.DataFrame | None = None
    used: list[str] = field(default_factory=list)  # files read for the labels, not images


def check_sources(sources: list[dict]) -> list[dict]:
    """``external.sources`` (already typed by the params layer): names distinct, paths there."""
    seen = set()
    for number, entry in enumerate(sources, 1):
        name = entry["name"]
        if name in seen:
            raise PipelineError(f"params.yaml: external.sources item {number} repeats the name {name!r}; "
                                f"give each set its own name")
        if entry["path"] and not Path(entry["path"]).expanduser().exists():
            raise PipelineError(f"params.yaml: external.sources item {number} ({name}): {entry['path']} "
                                f"does not exist")
        seen.add(name)
    return sources


def locate(entry: dict, settings: dict) -> Source:
    """The files of one listed set; a ``download`` set is fetched into the cache first
    (resumably, its SHA-256 recorded and later checked, as the download stage does)."""
    if entry["path"]:
        return Source(entry["name"], [Path(entry["path"]).expanduser()])
    cache = Path(settings["cache_dir"]) / entry["download"]
    paths, _ = isic2018.download_isic2018(settings["isic2018_url"], cache, retries=int(settings["retries"]),
                                          session=requests.Session(), files=isic2018.ISIC2018_TEST_FILES)
    images, truth = paths
    log.info("%s: no lesion groupings are published for it, so its intervals resample images", entry["name"])
    return Source(entry["name"], [images], isic2018.isic2018_metadata(truth, None))


def load_labelled(paths: list[Path], size: int, decode_all, *, metadata: pd.DataFrame | None = None,
                  metadata_origin: str = "", used: list[str] = (), select=None):
    """The labelled images of a HAM10000-layout source, decoded as the pipeline decodes:
    the rows that decoded (with ``label``), their pixels, the decoding errors and how many
    images were listed. ``select`` may narrow the metadata first (a frame to a frame)."""
    with tempfile.TemporaryDirectory() as scratch:
        collector = archives.Collector(Path(scratch), MAX_BYTES)
        try:
            found = assemble.index(collector, collector.collect(paths), metadata_frame=metadata,
                                   metadata_origin=metadata_origin, used=used)
            frame = found.metadata if select is None else select(found.metadata).reset_index(drop=True)
            ok, pixels, errors = decode_all([found.images[image_id] for image_id in frame["image_id"]], size)
        finally:
            collector.close()
    decoded = frame.iloc[ok].reset_index(drop=True)
    return decoded.assign(label=decoded["dx"].map(CLASSES.index)), pixels, errors, len(frame)


def load_source(source: Source, size: int, decode_all):
    """The metadata (with labels) and decoded images of one set; files that cannot be
    decoded are reported and left out."""
    frame, pixels, errors, _ = load_labelled(source.paths, size, decode_all, metadata=source.metadata,
                                             metadata_origin=source.name, used=source.used)
    for error in errors:
        log.warning("left out: %s", error)
    return frame, pixels


def score_sources(model, info: dict, sources: list[Source], settings: dict, out: Path, decode_all) -> dict[str, dict]:
    """Score every source; writes ``out/NAME.json`` and ``out/NAME/`` plots, returns the metrics by name."""
    results = {}
    device = inference.scoring_device()
    model = model.to(device)
    for source in sources:
        frame, pixels = load_source(source, info["image_size"], decode_all)
        if not len(frame):
            raise PipelineError(f"external source {source.name} ({', '.join(map(str, source.paths))}): "
                                f"no readable image")
        results[source.name] = evaluate.evaluate_split(
            partial(inference.view_logits, model, info, device=device), info, frame, pixels, settings,
            metrics_path=out / f"{source.name}.json", plots_dir=out / source.name,
            progress=f"external {source.name}")
    return results

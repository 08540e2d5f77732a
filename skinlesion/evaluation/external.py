"""Labelled sets from elsewhere, scored like the test split: any folder or zip in
HAM10000 layout (metadata CSV, images, optional masks), decoded exactly as the
pipeline decodes, with the same headline metrics, intervals and plots."""

from __future__ import annotations

import logging
import re
import tempfile
from functools import partial
from pathlib import Path

from skinlesion import CLASSES, PipelineError
from skinlesion.data import archives, assemble
from skinlesion.evaluation import evaluate, inference

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_BYTES = 64 * 2**30


def check_sources(sources: list) -> list[dict]:
    """``external.sources`` as a list of {name, path}, each name a safe file name, once."""
    checked, seen = [], set()
    for number, entry in enumerate(sources, 1):
        if not isinstance(entry, dict) or set(entry) != {"name", "path"}:
            raise PipelineError(f"params.yaml: external.sources item {number} is {entry!r}; expected "
                                f"{{name: NAME, path: FOLDER_OR_ZIP}}")
        name, path = str(entry["name"]), Path(str(entry["path"])).expanduser()
        if not NAME.match(name) or name in seen:
            raise PipelineError(f"params.yaml: external.sources item {number} has name {name!r}; names must be "
                                f"distinct and made of letters, digits, '_', '-' and '.'")
        if not path.exists():
            raise PipelineError(f"params.yaml: external.sources item {number} ({name}): {path} does not exist")
        seen.add(name)
        checked.append({"name": name, "path": path})
    return checked


def load_source(path: Path, size: int, decode_all):
    """The metadata (with labels) and decoded images of a HAM10000-layout source;
    files that cannot be decoded are reported and left out."""
    with tempfile.TemporaryDirectory() as scratch:
        collector = archives.Collector(Path(scratch), MAX_BYTES)
        try:
            found = assemble.index(collector, collector.collect([path]))
            frame = found.metadata
            ok, pixels, errors = decode_all([found.images[image_id] for image_id in frame["image_id"]], size)
        finally:
            collector.close()
    for error in errors:
        log.warning("left out: %s", error)
    frame = frame.iloc[ok].reset_index(drop=True)
    return frame.assign(label=frame["dx"].map(CLASSES.index)), pixels


def score_sources(model, info: dict, sources: list[dict], settings: dict, out: Path, decode_all) -> dict[str, dict]:
    """Score every source; writes ``out/NAME.json`` and ``out/NAME/`` plots, returns the metrics by name."""
    results = {}
    for source in sources:
        frame, pixels = load_source(source["path"], info["image_size"], decode_all)
        if not len(frame):
            raise PipelineError(f"external source {source['name']} ({source['path']}): no readable image")
        results[source["name"]] = evaluate.evaluate_split(
            partial(inference.view_logits, model, info), info, frame, pixels, settings,
            metrics_path=out / f"{source['name']}.json", plots_dir=out / source["name"],
            progress=f"external {source['name']}")
    return results

"""Labelled sets from elsewhere, scored like the test split: any folder or zip in
HAM10000 layout (metadata CSV, images, optional masks), or the ISIC 2018 Task 3 test
set downloaded with its public ground truth (the DermaMNIST-E protocol: train on
HAM10000, test on ISIC 2018), decoded exactly as the pipeline decodes, with the same
headline metrics, intervals and plots."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from skinlesion import CLASSES, PipelineError
from skinlesion.data import archives, assemble, isic2018
from skinlesion.data.images import decode_all
from skinlesion.data.prepare import Prepared
from skinlesion.evaluation import evaluate, inference
from skinlesion.modelinfo import ModelInfo
from skinlesion.params import Evaluate, External, ExternalSource

log = logging.getLogger(__name__)
MAX_BYTES = 64 * 2**30


@dataclass
class Source:
    """Where one external set's files are, and its labels when they are not a HAM10000 CSV."""
    name: str
    paths: list[Path]
    metadata: pd.DataFrame | None = None
    used: list[str] = field(default_factory=list)  # files read for the labels, not images


def check_sources(sources: list[ExternalSource]) -> list[ExternalSource]:
    """``external.sources`` (already typed by the params layer): names distinct, paths there."""
    seen = set()
    for number, entry in enumerate(sources, 1):
        name = entry.name
        if name in seen:
            raise PipelineError(f"params.yaml: external.sources item {number} repeats the name {name!r}; "
                                f"give each set its own name")
        if entry.path and not Path(entry.path).expanduser().exists():
            raise PipelineError(f"params.yaml: external.sources item {number} ({name}): {entry.path} "
                                f"does not exist")
        seen.add(name)
    return sources


def locate(entry: ExternalSource, settings: External) -> Source:
    """The files of one listed set; a ``download`` set is fetched into the cache first
    (resumably, its SHA-256 recorded and later checked, as the download stage does)."""
    if entry.path:
        return Source(entry.name, [Path(entry.path).expanduser()])
    cache = Path(settings.cache_dir) / entry.download
    paths, _ = isic2018.download_isic2018(settings.isic2018_url, cache, retries=settings.retries,
                                          session=requests.Session(), files=isic2018.ISIC2018_TEST_FILES)
    images, truth = paths
    log.info("%s: no lesion groupings are published for it, so its intervals resample images", entry.name)
    return Source(entry.name, [images], isic2018.isic2018_metadata(truth, None))


def load_labelled(paths: list[Path], size: int, *, metadata: pd.DataFrame | None = None,
                  metadata_origin: str = "", used: list[str] = (), select=None, check=None):
    """The labelled images of a HAM10000-layout source, decoded as the pipeline decodes:
    the rows that decoded (with ``label``), their pixels, the decoding errors and how many
    images were listed. ``select`` may narrow the metadata first (a frame to a frame);
    ``check`` is given the source's files on disk before any is read."""
    with tempfile.TemporaryDirectory() as scratch:
        collector = archives.Collector(Path(scratch), MAX_BYTES)
        try:
            members = collector.collect(paths)
            if check is not None:
                check(collector.on_disk(members))
            found = assemble.index(collector, members, metadata_frame=metadata,
                                   metadata_origin=metadata_origin, used=used)
            frame = found.metadata if select is None else select(found.metadata).reset_index(drop=True)
            ok, pixels, errors = decode_all([found.images[image_id] for image_id in frame["image_id"]], size)
        finally:
            collector.close()
    decoded = frame.iloc[ok].reset_index(drop=True)
    return decoded.assign(label=decoded["dx"].map(CLASSES.index)), pixels, errors, len(frame)


def load_source(source: Source, size: int):
    """The metadata (with labels) and decoded images of one set; files that cannot be
    decoded are reported and left out."""
    frame, pixels, errors, _ = load_labelled(source.paths, size, metadata=source.metadata,
                                             metadata_origin=source.name, used=source.used)
    for error in errors:
        log.warning("left out: %s", error)
    return frame, pixels


@dataclass
class OwnData:
    """What the pipeline itself was built from (the download stage's source, all splits):
    its image and lesion ids and a digest of each image's pixels at the working size."""
    image_ids: set[str]
    lesion_ids: set[str]
    size: int
    digests: set[bytes]

    @classmethod
    def of(cls, prepared: Path) -> OwnData:
        data = Prepared(prepared)
        return cls(set(data.index["image_id"]), set(data.index["lesion_id"]), int(data.images.shape[1]),
                   {_digest(image) for image in data.images})


def _digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def shared_with(own: OwnData, frame: pd.DataFrame, pixels: np.ndarray) -> dict:
    """How many of a set's images are the pipeline's own: by image_id, by lesion_id, or
    with identical pixels (a copy under another name), and all of these together."""
    by_id = frame["image_id"].isin(own.image_ids).to_numpy()
    by_lesion = frame["lesion_id"].isin(own.lesion_ids).to_numpy()
    by_pixels = np.array([_digest(image) in own.digests for image in pixels], dtype=bool) \
        if len(pixels) and pixels.shape[1] == own.size else np.zeros(len(frame), dtype=bool)
    return {"images": int((by_id | by_lesion | by_pixels).sum()), "by_image_id": int(by_id.sum()),
            "by_lesion_id": int(by_lesion.sum()), "by_pixels": int(by_pixels.sum())}


def score_sources(model, info: ModelInfo, sources: list[Source], settings: Evaluate, out: Path,
                  own: OwnData | None = None) -> dict[str, dict]:
    """Score every source; writes ``out/NAME.json`` and ``out/NAME/`` plots, returns the metrics by name.
    With ``own``, each result says how many of its images are the pipeline's own data, and a
    set that shares any is named in a warning: its figures are not an external test."""
    results = {}
    predictor = inference.TorchPredictor(model, info, inference.scoring_device())
    for source in sources:
        frame, pixels = load_source(source, info.image_size)
        if not len(frame):
            raise PipelineError(f"external source {source.name} ({', '.join(map(str, source.paths))}): "
                                f"no readable image")
        results[source.name] = evaluate.evaluate_split(
            predictor, frame, pixels, settings, metrics_path=out / f"{source.name}.json", plots_dir=out / source.name,
            progress=f"external {source.name}")
        if own is not None:
            shared = shared_with(own, frame, pixels)
            results[source.name]["shared_with_own_data"] = shared
            if shared["images"]:
                log.warning("warning: external set %s shares %d of its %d images with the data this pipeline was "
                            "built from (%d by image_id, %d by lesion_id, %d with identical pixels): its figures "
                            "are not an external test", source.name, shared["images"], len(frame),
                            shared["by_image_id"], shared["by_lesion_id"], shared["by_pixels"])
    return results

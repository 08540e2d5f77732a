"""A source's files brought into the one canonical layout of ``data/raw/``:

    data/raw/metadata.csv      the official columns, sorted by image_id
    data/raw/images/ID.jpg     the images as they arrived, byte for byte
    data/raw/masks/ID.png      lesion masks, where the source has them
    data/raw/provenance.json   what came from where, its hashes, what was left out

Every source (a download or a local copy) passes the same validation here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skinlesion import CLASSES, PipelineError
from skinlesion.data import images as decoding
from skinlesion.data import metadata
from skinlesion.data.archives import CHECKSUM_FILE, IMAGE_NAME, MASK_NAME, SHOWN, TABLE_SUFFIXES, Collector, Member, names
from skinlesion.files import write_json
from skinlesion.progress import bar, threads

log = logging.getLogger(__name__)


def assemble(
    paths: list[Path],
    out: Path,
    *,
    scratch: Path,
    max_bytes: int,
    source_info: dict,
    metadata_frame: pd.DataFrame | None = None,
    used: Iterable[str] = (),
) -> dict:
    """Validate the files under ``paths`` and write the canonical layout into ``out``
    (an empty folder). Returns the provenance record it also writes.

    ``metadata_frame`` replaces the metadata CSV search (for sources that ship their
    labels in another form); ``used`` names files that built it, so they are not
    reported as left out.
    """
    collector = Collector(scratch, max_bytes)
    try:
        members = collector.collect(paths)
        return _assemble(collector, members, out, source_info, metadata_frame, set(used))
    finally:
        collector.close()


@dataclass
class Indexed:
    """What a source holds, sorted out: its metadata, and its images and masks by
    image_id; everything else by name."""

    metadata: pd.DataFrame
    metadata_origin: str
    images: dict[str, Member]
    masks: dict[str, Member]
    others: list[str]
    unlisted_images: list[str]
    unlisted_masks: list[str]


def _find_metadata(collector: Collector, tables: list[Member], count: int) -> Member:
    """The one table among ``tables`` that is a HAM10000 metadata CSV."""
    candidates = [t for t in tables if metadata.header_looks_like_metadata(collector.materialize(t), name=t.origin)]
    if not candidates:
        named = [t for t in tables if "metadata" in t.name.lower()]
        if len(named) == 1:  # the metadata file is there but broken: say what is wrong with it
            metadata.read(collector.materialize(named[0]), name=named[0].origin)
        raise PipelineError(
            f"no metadata CSV found among {count} files (expected one with columns "
            f"lesion_id, image_id, dx, ...); tables seen: {names([t.origin for t in tables]) or 'none'}"
        )
    if len(candidates) > 1:
        raise PipelineError(f"several metadata CSVs found: {names([c.origin for c in candidates])}; keep one")
    return candidates[0]


def index(collector: Collector, members: list[Member], *, metadata_frame: pd.DataFrame | None = None,
          metadata_origin: str = "", used: Iterable[str] = ()) -> Indexed:
    """Sort ``members`` into metadata, images and masks, and check that every listed
    image is there exactly once. Raises PipelineError naming what is wrong."""
    used = set(used)
    images: dict[str, Member] = {}
    masks: dict[str, Member] = {}
    tables: list[Member] = []
    others: list[str] = []
    for member in members:
        if member.name in used:
            continue
        if match := MASK_NAME.match(member.name):
            bucket = masks
        elif match := IMAGE_NAME.match(member.name):
            bucket = images
        else:
            if Path(member.name).suffix.lower() in TABLE_SUFFIXES:
                tables.append(member)
            elif member.name != CHECKSUM_FILE:
                others.append(member.origin)
            continue
        key = match.group("id")
        if key in bucket:
            raise PipelineError(
                f"two files for image_id {key}: {bucket[key].origin} and {member.origin}; "
                f"remove one of them"
            )
        bucket[key] = member

    if metadata_frame is None:
        found = _find_metadata(collector, tables, len(members))
        metadata_origin = found.origin
        metadata_frame = metadata.read(collector.materialize(found), name=metadata_origin)
        tables.remove(found)
    others.extend(t.origin for t in tables)

    listed = set(metadata_frame["image_id"])
    missing = sorted(listed - images.keys())
    if missing:
        absent = set(missing)
        elsewhere = sorted(origin for origin in others if Path(origin.split(":")[-1]).stem in absent)
        hint = (f"; {len(elsewhere)} of them are there under another extension ({names(elsewhere)}), but a "
                f"HAM10000 source holds its images as .jpg/.jpeg: convert those to JPEG") if elsewhere else ""
        raise PipelineError(
            f"{len(missing)} image(s) listed in {metadata_origin} are missing: {names(missing)}{hint}"
        )
    return Indexed(metadata_frame, metadata_origin, images, masks, sorted(others),
                   sorted(images[key].origin for key in images.keys() - listed),
                   sorted(masks[key].origin for key in masks.keys() - listed))


def _assemble(collector, members, out, source_info, metadata_frame, used) -> dict:
    found = index(collector, members, metadata_frame=metadata_frame, used=used,
                  metadata_origin=source_info.get("metadata", "built from the source's ground truth"))
    metadata_frame, images, masks = found.metadata, found.images, found.masks
    metadata_origin = found.metadata_origin

    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    ids = list(metadata_frame["image_id"])

    def copy(image_id: str) -> list[str]:
        # Checked by the decoding that prepare and the prediction command use, so a file
        # kept here is one they read, with the same pixels.
        problems = []
        for member, target, check in ((images[image_id], out / "images" / f"{image_id}.jpg", decoding.problem),
                                      (masks.get(image_id), out / "masks" / f"{image_id}.png", decoding.mask_problem)):
            if member is None:
                continue
            try:
                data = decoding.read(member)
            except decoding.Unusable as error:
                problems.append(f"{member.origin} {error}")
                continue
            if reason := check(data):
                problems.append(f"{member.origin} {reason}")
            else:
                target.write_bytes(data)
        return problems

    workers = min(8, os.cpu_count() or 1)
    with threads(workers) as pool:
        results = list(bar(pool.map(copy, ids), total=len(ids), desc="validate images", unit="img"))
    problems = [problem for result in results for problem in result]
    if problems:
        raise PipelineError(f"{len(problems)} unusable file(s): {'; '.join(problems[:SHOWN])}"
                            + (f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""))

    metadata.write(out / "metadata.csv", metadata_frame)
    with_masks = sum(image_id in masks for image_id in ids)
    counts = metadata_frame["dx"].value_counts()
    record = {
        "source": source_info,
        "metadata": metadata_origin,
        "images": len(ids),
        "lesions": int(metadata_frame["lesion_id"].nunique()),
        "masks": with_masks,
        "class_counts": {name: int(counts.get(name, 0)) for name in CLASSES},
        "left_out": {
            "files_not_images": found.others,
            "images_not_in_metadata": found.unlisted_images,
            "masks_not_in_metadata": found.unlisted_masks,
        },
    }
    write_json(out / "provenance.json", record)
    log.info("kept %d images of %d lesions, %d with masks", len(ids), record["lesions"], with_masks)
    for label, items in record["left_out"].items():
        if items:
            log.warning("left out %d %s: %s", len(items), label.replace("_", " "), names(items))
    return record


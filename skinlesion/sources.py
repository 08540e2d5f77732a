"""Where HAM10000 comes from, brought into the one canonical layout of ``data/raw/``:

    data/raw/metadata.csv      the official columns, sorted by image_id
    data/raw/images/ID.jpg     the images as they arrived, byte for byte
    data/raw/masks/ID.png      lesion masks, where the source has them
    data/raw/provenance.json   what came from where, its hashes, what was left out

Sources: the official Harvard Dataverse files, the ISIC 2018 Task 3 training
archives, or a local folder or zip in HAM10000 layout (loose files or zips inside).
Remote files are downloaded (resumably, verified) into a cache folder and then
read like a local source, so every source passes the same validation.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import requests
from PIL import Image, UnidentifiedImageError

from skinlesion import CLASSES, PipelineError, metadata
from skinlesion.downloads import fetch
from skinlesion.files import atomic_dir, file_digest, write_json
from skinlesion.progress import bar

log = logging.getLogger(__name__)

SOURCES = ("dataverse", "isic2018", "local")
IMAGE_NAME = re.compile(r"^(?P<id>.+)\.jpe?g$", re.IGNORECASE)
MASK_NAME = re.compile(r"^(?P<id>.+)_segmentation\.png$", re.IGNORECASE)
TABLE_SUFFIXES = {".csv", ".tab", ".tsv"}
CHECKSUM_FILE = "SHA256SUMS"
_SHOWN = 5


@dataclass(frozen=True)
class Member:
    """One file of a source: loose on disk or inside a zip."""

    origin: str  # for messages: "folder/a.jpg" or "archive.zip:dir/a.jpg"
    name: str  # the file name without folders
    size: int
    open: Callable[[], object] = field(compare=False, repr=False)
    path: Path | None = None  # set for a loose file on disk

    def read(self) -> bytes:
        with self.open() as handle:
            return handle.read()


def _check_member_name(archive: str, name: str) -> None:
    normalized = posixpath.normpath(name.replace("\\", "/"))
    if (
        normalized.startswith("/")
        or re.match(r"^[A-Za-z]:", normalized)
        or normalized == ".."
        or normalized.startswith("../")
    ):
        raise PipelineError(
            f"{archive}: member '{name}' points outside the folder it would be extracted to; "
            f"refusing this archive (it may be malicious)"
        )


class Collector:
    """Lists the members of a source, descending into zips (and zips in zips).

    Every archive member name is checked before anything is read, and the total
    unpacked size is capped, so a hostile archive is refused rather than unpacked.
    """

    def __init__(self, scratch: Path, max_bytes: int):
        self.scratch = scratch
        self.max_bytes = max_bytes
        self.unpacked = 0
        self._archives: list[zipfile.ZipFile] = []

    def close(self) -> None:
        for archive in self._archives:
            archive.close()

    def collect(self, paths: Iterable[Path]) -> list[Member]:
        members: list[Member] = []
        for path in paths:
            path = Path(path)
            if path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    members.extend(self._file(file, str(file.relative_to(path.parent))))
            elif path.is_file():
                members.extend(self._file(path, path.name))
            else:
                raise PipelineError(f"{path}: no such file or folder")
        return members

    def _file(self, path: Path, origin: str) -> list[Member]:
        if path.suffix.lower() == ".zip":
            return self._zip(path, origin)
        return [Member(origin, path.name, path.stat().st_size, lambda p=path: open(p, "rb"), path)]

    def _zip(self, path: Path, origin: str) -> list[Member]:
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise PipelineError(f"{origin}: not a readable zip ({error})") from None
        self._archives.append(archive)
        infos = [info for info in archive.infolist() if not info.is_dir()]
        for info in infos:
            _check_member_name(origin, info.filename)
        self.unpacked += sum(info.file_size for info in infos)
        if self.unpacked > self.max_bytes:
            raise PipelineError(
                f"{origin}: archives expand to more than {self.max_bytes / 2**30:.3g} GiB "
                f"(download.max_unpacked_gb); refusing to unpack (zip bomb?). Raise the limit "
                f"if this source is really that large"
            )
        members: list[Member] = []
        for info in sorted(infos, key=lambda info: info.filename):
            inner = f"{origin}:{info.filename}"
            name = posixpath.basename(info.filename.replace("\\", "/"))
            if name.lower().endswith(".zip"):
                nested = Path(tempfile.mkdtemp(dir=self.scratch)) / name
                with archive.open(info) as source, open(nested, "wb") as target:
                    while chunk := source.read(1 << 20):
                        target.write(chunk)
                members.extend(self._zip(nested, inner))
            else:
                members.append(Member(inner, name, info.file_size,
                                      lambda a=archive, i=info: a.open(i)))
        return members

    def materialize(self, member: Member) -> Path:
        """A path on disk holding ``member`` (extracted into scratch if it is in a zip)."""
        if member.path is not None:
            return member.path
        target = Path(tempfile.mkdtemp(dir=self.scratch)) / member.name
        target.write_bytes(member.read())
        return target


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def check_image(data: bytes, *, rgb: bool) -> str | None:
    """Why ``data`` is not a usable image, or None when it decodes completely."""
    try:
        with Image.open(BytesIO(data)) as image:
            image.load()
            if rgb and image.mode != "RGB":
                return f"has mode {image.mode}, expected an RGB colour image"
    except Image.DecompressionBombError as error:
        return f"is implausibly large ({error})"
    except UnidentifiedImageError:
        return "is empty (0 bytes)" if not data else "is not an image format Pillow recognises"
    except (OSError, SyntaxError, ValueError) as error:
        return f"cannot be decoded ({error})"
    return None


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
        candidates = [t for t in tables if metadata.header_looks_like_metadata(collector.materialize(t))]
        if not candidates:
            named = [t for t in tables if "metadata" in t.name.lower()]
            if len(named) == 1:  # the metadata file is there but broken: say what is wrong with it
                metadata.read(collector.materialize(named[0]), name=named[0].origin)
            raise PipelineError(
                f"no metadata CSV found among {len(members)} files (expected one with columns "
                f"lesion_id, image_id, dx, ...); tables seen: {_names([t.origin for t in tables]) or 'none'}"
            )
        if len(candidates) > 1:
            raise PipelineError(
                f"several metadata CSVs found: {_names([c.origin for c in candidates])}; keep one"
            )
        metadata_origin = candidates[0].origin
        metadata_frame = metadata.read(collector.materialize(candidates[0]), name=metadata_origin)
        tables.remove(candidates[0])
    others.extend(t.origin for t in tables)

    listed = set(metadata_frame["image_id"])
    missing = sorted(listed - images.keys())
    if missing:
        raise PipelineError(
            f"{len(missing)} image(s) listed in {metadata_origin} are missing: {_names(missing)}"
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
        problems = []
        data = images[image_id].read()
        if reason := check_image(data, rgb=True):
            problems.append(f"{images[image_id].origin} {reason}")
        else:
            (out / "images" / f"{image_id}.jpg").write_bytes(data)
        if image_id in masks:
            mask = masks[image_id].read()
            if reason := check_image(mask, rgb=False):
                problems.append(f"{masks[image_id].origin} {reason}")
            else:
                (out / "masks" / f"{image_id}.png").write_bytes(mask)
        return problems

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(bar(pool.map(copy, ids), total=len(ids), desc="validate images", unit="img"))
    problems = [problem for result in results for problem in result]
    if problems:
        raise PipelineError(f"{len(problems)} unreadable file(s): {'; '.join(problems[:_SHOWN])}"
                            + (f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""))

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
            log.warning("left out %d %s: %s", len(items), label.replace("_", " "), _names(items))
    return record


# --- checksums -----------------------------------------------------------------

def read_checksums(path: Path) -> dict[str, str]:
    """``sha256sum``-style lines (``HASH  NAME``) as {name: hash}."""
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            raise PipelineError(f"{path}: line {number} is not 'SHA256  NAME'")
        entries[parts[1].strip().lstrip("*")] = parts[0].lower()
    return entries


def verify_local_checksums(folder: Path) -> dict[str, str]:
    """Check the files a local source's SHA256SUMS lists; return what was verified."""
    sums = folder / CHECKSUM_FILE
    if not sums.is_file():
        return {}
    expected = read_checksums(sums)
    for name, digest in bar(sorted(expected.items()), desc="verify checksums", unit="file"):
        target = folder / name
        if not target.is_file():
            raise PipelineError(f"{sums} lists {name}, which is not in {folder}")
        actual = file_digest(target)
        if actual != digest:
            raise PipelineError(f"{target}: SHA-256 {actual} does not match {sums} ({digest})")
    return expected


# --- remote sources ------------------------------------------------------------

DATAVERSE_FILES = {
    "images": re.compile(r"^HAM10000_images.*\.zip$", re.IGNORECASE),
    "metadata": re.compile(r"^HAM10000_metadata(\.csv|\.tab)?$", re.IGNORECASE),
    "masks": re.compile(r"^HAM10000_segmentations.*\.zip$", re.IGNORECASE),
}


def download_dataverse(server: str, doi: str, cache: Path, *, retries: int,
                       session: requests.Session) -> tuple[list[Path], dict]:
    """Fetch the HAM10000 files from a Dataverse server, each checked against the MD5
    the server's file listing publishes. Returns the local files and a record."""
    server = server.rstrip("/")
    listing_url = f"{server}/api/datasets/:persistentId/versions/:latest-published/files"
    try:
        response = session.get(listing_url, params={"persistentId": doi}, timeout=(15, 60))
        response.raise_for_status()
        entries = response.json()["data"]
    except (requests.RequestException, ValueError, KeyError) as error:
        raise PipelineError(
            f"cannot list the files of {doi} at {server} ({error}); check the network, or use "
            f"download.source=local with a copy of HAM10000 (see README, 'Offline')"
        ) from None
    chosen: dict[str, list[dict]] = {kind: [] for kind in DATAVERSE_FILES}
    for entry in entries:
        data_file = entry.get("dataFile", {})
        name = data_file.get("originalFileName") or data_file.get("filename") or entry.get("label", "")
        for kind, pattern in DATAVERSE_FILES.items():
            if pattern.match(name):
                chosen[kind].append({**data_file, "_name": name})
    if not chosen["images"] or not chosen["metadata"]:
        raise PipelineError(
            f"{doi} at {server} lists no HAM10000 image zips or metadata file; files listed: "
            f"{_names(sorted(e.get('label', '?') for e in entries))}"
        )
    paths, record = [], []
    for kind in DATAVERSE_FILES:
        for data_file in sorted(chosen[kind], key=lambda f: f["_name"]):
            original = bool(data_file.get("originalFileName"))
            url = f"{server}/api/access/datafile/{data_file['id']}" + ("?format=original" if original else "")
            checksum = data_file.get("checksum") or {}
            if checksum.get("type") and checksum.get("value"):
                expected = (checksum["type"].lower().replace("-", ""), checksum["value"])
            elif data_file.get("md5"):
                expected = ("md5", data_file["md5"])
            else:
                raise PipelineError(f"{data_file['_name']}: the Dataverse listing gives no checksum")
            size = data_file.get("originalFileSize") if original else data_file.get("filesize")
            path = fetch(url, cache / data_file["_name"], size=size, checksum=expected,
                         retries=retries, session=session)
            paths.append(path)
            record.append({"name": path.name, "url": url, expected[0]: expected[1],
                           "sha256": file_digest(path)})
    return paths, {"files": record}


ISIC2018_FILES = (
    "ISIC2018_Task3_Training_Input.zip",
    "ISIC2018_Task3_Training_GroundTruth.zip",
    "ISIC2018_Task3_Training_LesionGroupings.csv",
)


def _recorded_checksums(cache: Path) -> dict[str, str]:
    record = cache / CHECKSUM_FILE
    return read_checksums(record) if record.is_file() else {}


def download_isic2018(base_url: str, cache: Path, *, retries: int,
                      session: requests.Session) -> tuple[list[Path], dict]:
    """Fetch the ISIC 2018 Task 3 training archives. No checksums are published for
    them, so the SHA-256 of what first arrived is recorded in the cache's SHA256SUMS
    and every later download must match it."""
    base_url = base_url.rstrip("/")
    known = _recorded_checksums(cache)
    paths, record = [], []
    for name in ISIC2018_FILES:
        expected = ("sha256", known[name]) if name in known else None
        try:
            path = fetch(f"{base_url}/{name}", cache / name, checksum=expected, retries=retries,
                         session=session)
        except PipelineError as error:
            if expected and "checksum mismatch" in str(error):
                raise PipelineError(
                    f"{error}. The file differs from the copy first downloaded (recorded in "
                    f"{cache / CHECKSUM_FILE}); if the change is expected, delete that line"
                ) from None
            raise
        digest = file_digest(path)
        known[name] = digest
        paths.append(path)
        record.append({"name": name, "url": f"{base_url}/{name}", "sha256": digest})
    write_checksums(cache / CHECKSUM_FILE, known)
    return paths, {"files": record}


def write_checksums(path: Path, entries: dict[str, str]) -> None:
    from skinlesion.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(entries.items())))


def isic2018_metadata(ground_truth_zip: Path, groupings_csv: Path) -> pd.DataFrame:
    """HAM10000-style metadata from the ISIC 2018 one-hot ground truth and the lesion
    groupings (age, sex and localization are not published there and stay empty)."""
    with zipfile.ZipFile(ground_truth_zip) as archive:
        names = [n for n in archive.namelist() if n.lower().endswith(".csv")]
        if len(names) != 1:
            raise PipelineError(f"{ground_truth_zip.name}: expected one CSV inside, found {names}")
        _check_member_name(ground_truth_zip.name, names[0])
        with archive.open(names[0]) as handle:
            truth = pd.read_csv(handle)
    columns = [name.upper() for name in CLASSES]
    missing = [c for c in ["image", *columns] if c not in truth.columns]
    if missing:
        raise PipelineError(f"{ground_truth_zip.name}: ground truth lacks column(s) {missing}")
    one_hot = truth[columns].to_numpy()
    bad = (one_hot.sum(axis=1) != 1) | ~((one_hot == 0) | (one_hot == 1)).all(axis=1)
    if bad.any():
        lines = [str(i + 2) for i in bad.nonzero()[0][:_SHOWN]]
        raise PipelineError(f"{ground_truth_zip.name}: rows on line(s) {', '.join(lines)} do not "
                            f"name exactly one diagnosis")
    truth = pd.DataFrame({"image_id": truth["image"].astype(str),
                          "dx": [CLASSES[i] for i in one_hot.argmax(axis=1)]})
    groups = pd.read_csv(groupings_csv, dtype=str, keep_default_na=False)
    if not {"image", "lesion_id"} <= set(groups.columns):
        raise PipelineError(f"{groupings_csv.name}: expected columns image, lesion_id")
    groups = groups.rename(columns={"image": "image_id", "diagnosis_confirm_type": "dx_type"})
    merged = truth.merge(groups, on="image_id", how="left", indicator=True)
    ungrouped = merged.loc[merged["_merge"] != "both", "image_id"].tolist()
    if ungrouped:
        raise PipelineError(f"{groupings_csv.name}: no lesion_id for {len(ungrouped)} image(s): "
                            f"{_names(ungrouped)}")
    for column in ("dx_type", "age", "sex", "localization"):
        if column not in merged:
            merged[column] = ""
    return metadata.validate(merged, f"{ground_truth_zip.name} + {groupings_csv.name}")


# --- the stage -----------------------------------------------------------------

def download(params: dict, out: Path, cache: Path) -> dict:
    """Bring the source that ``params`` (the ``download`` group) names into ``out``.

    ``out`` appears only complete: everything is built in a temporary folder beside
    it and renamed at the end.
    """
    source = params["source"]
    if source not in SOURCES:
        raise PipelineError(f"download.source is '{source}'; expected one of {', '.join(SOURCES)}")
    max_bytes = int(float(params["max_unpacked_gb"]) * 2**30)
    retries = int(params["retries"])
    extra: dict = {}
    used: list[str] = []
    metadata_frame = None
    session = requests.Session()
    cache = Path(cache)
    if source == "local":
        if not params.get("path"):
            raise PipelineError("download.source is 'local' but download.path is empty; set it to "
                                "a folder or zip in HAM10000 layout")
        location = Path(params["path"]).expanduser()
        if not location.exists():
            raise PipelineError(f"download.path {location} does not exist")
        paths = [location]
        info = {"kind": "local", "path": str(location)}
        if location.is_dir():
            verified = verify_local_checksums(location)
            if verified:
                info["sha256_verified"] = verified
    elif source == "dataverse":
        paths, extra = download_dataverse(params["dataverse_server"], params["dataverse_doi"],
                                          cache / "dataverse", retries=retries, session=session)
        info = {"kind": "dataverse", "doi": params["dataverse_doi"], **extra}
    else:
        paths, extra = download_isic2018(params["isic2018_url"], cache / "isic2018",
                                         retries=retries, session=session)
        by_name = {p.name: p for p in paths}
        metadata_frame = isic2018_metadata(by_name[ISIC2018_FILES[1]], by_name[ISIC2018_FILES[2]])
        paths = [by_name[ISIC2018_FILES[0]]]
        used = [ISIC2018_FILES[1], ISIC2018_FILES[2]]
        info = {"kind": "isic2018", **extra}

    with atomic_dir(out) as building, tempfile.TemporaryDirectory(dir=Path(out).parent,
                                                                   prefix=".scratch.") as scratch:
        record = assemble(paths, building, scratch=Path(scratch), max_bytes=max_bytes,
                          source_info=info, metadata_frame=metadata_frame, used=used)
    log.info("wrote %s: %s", out, json.dumps(record["class_counts"]))
    return record

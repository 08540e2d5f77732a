"""The official HAM10000 files from a Harvard Dataverse server, each checked against
the MD5 the server's file listing publishes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests

from skinlesion import PipelineError
from skinlesion.data.archives import names
from skinlesion.data.http import capped_body, fetch
from skinlesion.files import file_digest
from skinlesion.untrusted import file_name, inside, shown

MAX_LISTING = 16 * 2**20  # bytes of a file listing (HAM10000's is a few kB)
ALGORITHMS = ("md5", "sha1", "sha256", "sha512")

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
    where = f"the file listing of {doi} at {server}"
    try:
        with session.get(listing_url, params={"persistentId": doi}, timeout=(15, 60), stream=True) as response:
            response.raise_for_status()
            body = capped_body(response, MAX_LISTING, where)
        entries = json.loads(body)["data"]
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise ValueError("'data' is not a list of files")
    except (requests.RequestException, ValueError, KeyError, TypeError, RecursionError) as error:
        raise PipelineError(
            f"cannot list the files of {doi} at {server} ({shown(error, 160)}); check the network, or use "
            f"download.source=local with a copy of HAM10000 (see README, 'Offline')"
        ) from None
    chosen: dict[str, list[dict]] = {kind: [] for kind in DATAVERSE_FILES}
    for entry in entries:
        data_file = entry.get("dataFile") or {}
        if not isinstance(data_file, dict):
            continue
        name = data_file.get("originalFileName") or data_file.get("filename") or entry.get("label", "")
        if not isinstance(name, str):
            continue
        for kind, pattern in DATAVERSE_FILES.items():
            if pattern.match(name):
                file_name(name, where)  # it becomes a path in the cache: a plain name, or refused
                chosen[kind].append({**data_file, "_name": name})
    if not chosen["images"] or not chosen["metadata"]:
        raise PipelineError(
            f"{doi} at {server} lists no HAM10000 image zips or metadata file; files listed: "
            f"{names(sorted(e.get('label', '?') for e in entries))}"
        )
    paths, record = [], []
    for kind in DATAVERSE_FILES:
        for data_file in sorted(chosen[kind], key=lambda f: f["_name"]):
            original = bool(data_file.get("originalFileName"))
            file_id = _whole(data_file, "id", "the file id", "a whole number", where)
            url = f"{server}/api/access/datafile/{file_id}" + ("?format=original" if original else "")
            expected = _checksum(data_file, where)
            size = _whole(data_file, "originalFileSize" if original else "filesize", "the size", "a number of bytes",
                          where, optional=True)
            path = fetch(url, inside(cache, data_file["_name"], where), size=size, checksum=expected,
                         retries=retries, session=session)
            paths.append(path)
            record.append({"name": path.name, "url": url, expected[0]: expected[1],
                           "sha256": file_digest(path)})
    return paths, {"files": record}


def _whole(data_file: dict, key: str, called: str, expected: str, where: str, optional: bool = False) -> int | None:
    """``data_file[key]`` if it is a whole number of at least 0 (or absent, if ``optional``)."""
    value = data_file.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PipelineError(f"{where}: {shown(data_file['_name'])} has {called} {shown(value)!r}, not {expected}; "
                            f"refusing the listing")
    return value


def _checksum(data_file: dict, where: str) -> tuple[str, str]:
    """The (algorithm, hex digest) the listing gives for ``data_file``, checked."""
    checksum = data_file.get("checksum") or {}
    if not isinstance(checksum, dict):
        checksum = {}
    if checksum.get("type") and checksum.get("value"):
        expected = (str(checksum["type"]).lower().replace("-", ""), checksum["value"])
    elif data_file.get("md5"):
        expected = ("md5", data_file["md5"])
    else:
        raise PipelineError(f"{shown(data_file['_name'])}: the Dataverse listing gives no checksum")
    algorithm, digest = expected
    if algorithm not in ALGORITHMS or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{32,128}", digest):
        raise PipelineError(f"{where}: {shown(data_file['_name'])} has the checksum {shown(algorithm)} "
                            f"{shown(digest)!r}, not one of {', '.join(ALGORITHMS)} in hex; refusing the listing")
    return expected

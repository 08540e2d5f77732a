"""The official HAM10000 files from a Harvard Dataverse server, each checked against
the MD5 the server's file listing publishes."""

from __future__ import annotations

import re
from pathlib import Path

import requests

from skinlesion import PipelineError
from skinlesion.data.archives import names
from skinlesion.data.http import fetch
from skinlesion.files import file_digest

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
            f"{names(sorted(e.get('label', '?') for e in entries))}"
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

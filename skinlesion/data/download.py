"""The download stage: bring HAM10000 from the source ``download.source`` names
into ``data/raw/`` (see skinlesion.data.assemble for the layout).

Sources: the official Harvard Dataverse files, the ISIC 2018 Task 3 training
archives, or a local folder or zip in HAM10000 layout (loose files or zips inside).
Remote files are downloaded (resumably, verified) into a cache folder and then
read like a local source, so every source passes the same validation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import requests

from skinlesion import PipelineError
from skinlesion.data.assemble import assemble
from skinlesion.data.checksums import verify_local_checksums
from skinlesion.data.dataverse import download_dataverse
from skinlesion.data.isic2018 import ISIC2018_FILES, download_isic2018, isic2018_metadata
from skinlesion.files import atomic_dir, scratch_dir
from skinlesion.params import Download

log = logging.getLogger(__name__)



def download(params: Download, out: Path, cache: Path) -> dict:
    """Bring the source that ``params`` (the ``download`` group) names into ``out``.

    ``out`` appears only complete: everything is built in a temporary folder beside
    it and renamed at the end.
    """
    source = params.source
    max_bytes = int(params.max_unpacked_gb * 2**30)
    retries = params.retries
    extra: dict = {}
    used: list[str] = []
    metadata_frame = None
    session = requests.Session()
    cache = Path(cache)
    if source == "local":
        if not params.path:
            raise PipelineError("download.source is 'local' but download.path is empty; set it to "
                                "a folder or zip in HAM10000 layout")
        location = Path(params.path).expanduser()
        if not location.exists():
            raise PipelineError(f"download.path {location} does not exist")
        paths = [location]
        info = {"kind": "local", "path": str(location)}
        if location.is_dir():
            verified = verify_local_checksums(location)
            if verified:
                info["sha256_verified"] = verified
    elif source == "dataverse":
        paths, extra = download_dataverse(params.dataverse_server, params.dataverse_doi,
                                          cache / "dataverse", retries=retries, session=session)
        info = {"kind": "dataverse", "doi": params.dataverse_doi, **extra}
    else:
        paths, extra = download_isic2018(params.isic2018_url, cache / "isic2018",
                                         retries=retries, session=session)
        by_name = {p.name: p for p in paths}
        metadata_frame = isic2018_metadata(by_name[ISIC2018_FILES[1]], by_name[ISIC2018_FILES[2]])
        paths = [by_name[ISIC2018_FILES[0]]]
        used = [ISIC2018_FILES[1], ISIC2018_FILES[2]]
        info = {"kind": "isic2018", **extra}

    with atomic_dir(out) as building, scratch_dir(out) as scratch:
        record = assemble(paths, building, scratch=scratch, max_bytes=max_bytes,
                          source_info=info, metadata_frame=metadata_frame, used=used)
    log.info("wrote %s: %s", out, json.dumps(record["class_counts"]))
    return record

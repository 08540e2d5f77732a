"""Resumable, verified HTTP downloads.

A file arrives as ``NAME.part`` and is renamed to ``NAME`` only once its size and
checksum are right, so a cut connection or a crash leaves at most a ``.part`` that
the next run resumes with an HTTP Range request.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import requests

from skinlesion import PipelineError
from skinlesion.files import file_digest
from skinlesion.progress import bar
from skinlesion.untrusted import TooLarge, shown

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # small reads: a cut connection loses at most this much of what arrived
TIMEOUT = (15, 60)  # connect, read (seconds)
MAX_UNLISTED = 32 * 2**30  # a download whose size nothing states stops here


def capped_body(response: requests.Response, limit: int, what: str) -> bytes:
    """The body of a streamed ``response``, read no further than ``limit`` bytes."""
    parts, received = [], 0
    for chunk in response.iter_content(CHUNK):
        received += len(chunk)
        if received > limit:
            raise TooLarge(f"{what} is larger than {limit / 2**20:.0f} MiB; refusing it")
        parts.append(chunk)
    return b"".join(parts)


def verify(path: Path, *, size: int | None = None, checksum: tuple[str, str] | None = None,
           name: str | None = None) -> None:
    """Raise PipelineError unless ``path`` has the expected size and checksum; messages
    call the file ``name`` (default: its own name)."""
    name = name or path.name
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise PipelineError(f"{name}: size {actual_size} bytes, expected {size}")
    if checksum is not None:
        algorithm, expected = checksum
        actual = file_digest(path, algorithm)
        if actual.lower() != expected.lower():
            raise PipelineError(
                f"{name}: {algorithm} checksum mismatch (expected {expected}, got {actual})"
            )


def fetch(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    checksum: tuple[str, str] | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    session: requests.Session | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part``.

    ``checksum`` is ``(algorithm, hexdigest)`` as hashlib names it (``"md5"``). A file
    already at ``dest`` that verifies is kept without a request. On a checksum
    mismatch the bad download is deleted, so the next run starts clean.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        try:
            verify(dest, size=size, checksum=checksum)
            log.info("%s: already downloaded and verified", dest.name)
            return dest
        except PipelineError as error:
            log.warning("%s: cached copy is bad (%s); downloading again", dest.name, error)
            dest.unlink()
    part = dest.with_name(dest.name + ".part")
    session = session or requests.Session()
    attempt = 0
    while True:
        try:
            _download_once(session, url, part, size)
            break
        except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.TooManyRedirects, requests.exceptions.InvalidHeader) as error:
            raise PipelineError(f"{dest.name}: the server at {shown(url)} sent an unusable answer "
                                f"({shown(error, 160)}); refusing the download") from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _Incomplete) as error:
            attempt += 1
            if attempt > retries:
                raise PipelineError(
                    f"{dest.name}: download from {url} failed after {retries} retries ({error}); "
                    f"run again to resume from {part.stat().st_size if part.exists() else 0} bytes"
                ) from None
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: connection lost (%s); resuming in %.0f s (retry %d of %d)",
                        dest.name, type(error).__name__, wait, attempt, retries)
            time.sleep(wait)
    try:
        verify(part, size=size, checksum=checksum, name=dest.name)
    except PipelineError as error:
        part.unlink()
        raise PipelineError(f"{error}; the download was deleted. Run again to retry; if it "
                            f"keeps failing, the file at {url} has changed") from None
    part.replace(dest)
    return dest


class _Incomplete(Exception):
    """The server closed the body before sending all it announced."""


def _download_once(session: requests.Session, url: str, part: Path, size: int | None) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset == size:
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, stream=True, timeout=TIMEOUT, headers=headers) as response:
        if response.status_code == 416 and offset:  # nothing left past what we hold
            return
        if response.status_code not in (200, 206):
            raise PipelineError(f"{url}: HTTP {response.status_code} {response.reason}")
        if response.status_code == 200 and offset:
            log.info("%s: server ignored the resume request; starting over", part.name)
            offset = 0
        mode = "ab" if offset else "wb"
        remaining = response.headers.get("Content-Length")
        if remaining is not None and not remaining.strip().isdigit():
            raise PipelineError(f"{url}: the server sent the length {shown(remaining)!r}, not a number of bytes")
        total = offset + int(remaining) if remaining is not None else size
        # Never more than the listing says (or, unlisted, than the server announced): checked while reading.
        limit = size if size is not None else total if total is not None else MAX_UNLISTED
        if total is not None and total > limit:
            raise PipelineError(f"{url}: the server announces {total} bytes, more than the {limit} listed; "
                                f"refusing the download")
        received = 0
        with open(part, mode) as handle, bar(total=total, initial=offset, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=part.name[: -len(".part")]) as progress:
            for chunk in response.iter_content(CHUNK):
                received += len(chunk)
                if offset + received > limit:
                    handle.close()
                    part.unlink(missing_ok=True)
                    raise PipelineError(f"{url}: the server sent more than the {limit} bytes "
                                        f"{'listed' if size is not None else 'it announced'}; the download was "
                                        f"deleted. Run again to retry")
                handle.write(chunk)
                progress.update(len(chunk))
        if remaining is not None and received < int(remaining):
            raise _Incomplete(f"got {received} of {remaining} bytes")


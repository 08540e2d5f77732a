"""``sha256sum``-style checksum files: read, verify a local source, record a download."""

from __future__ import annotations

import re
from pathlib import Path

from skinlesion import PipelineError
from skinlesion.data.archives import CHECKSUM_FILE
from skinlesion.files import atomic_path, file_digest
from skinlesion.progress import bar


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



def write_checksums(path: Path, entries: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(entries.items())))


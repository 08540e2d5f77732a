"""The files of a source, loose on disk or inside zips (and zips in zips), listed
without unpacking anything that could escape its folder or blow up the disk."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from skinlesion import PipelineError
from skinlesion.untrusted import member_path, shown

IMAGE_NAME = re.compile(r"^(?P<id>.+)\.jpe?g$", re.IGNORECASE)
MASK_NAME = re.compile(r"^(?P<id>.+)_segmentation\.png$", re.IGNORECASE)
TABLE_SUFFIXES = {".csv", ".tab", ".tsv"}
CHECKSUM_FILE = "SHA256SUMS"
SHOWN = 5  # how many offending files a message lists
MAX_NESTING = 8  # zips inside zips, this deep at most
MAX_MEMBERS = 1_000_000  # files listed by all the archives of one source


def names(items: list[str]) -> str:
    """The first few of ``items`` for a message, and how many more there are."""
    listed = ", ".join(shown(item, 120) for item in items[:SHOWN])  # escaped: names come from outside
    return listed + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


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


def check_member_name(archive: str, name: str) -> None:
    """Refuse an archive whose member ``name`` would land outside its folder."""
    member_path(name, archive)


def files_under(folder: Path) -> list[Path]:
    """The files under ``folder``, sorted. Links to files and to folders are followed
    (each real folder is read once, so a link loop ends); broken links are listed, so
    that reading them says so; pipes and devices are not (reading one could block).
    A folder that cannot be listed is an error, not silently skipped."""

    def unreadable(error: OSError) -> None:
        reason = "permission denied; give this user read access to it" if isinstance(error, PermissionError) \
            else (error.strerror or str(error))
        raise PipelineError(f"{error.filename}: cannot list this folder ({reason})")

    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for root, folders, files in os.walk(folder, onerror=unreadable, followlinks=True):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        for name in files:
            path = Path(root, name)
            if path.is_file() or (path.is_symlink() and not path.exists()):
                found.append(path)
    return sorted(found)


class Collector:
    """Lists the members of a source, descending into zips (and zips in zips).

    Every archive member name is checked before anything is read, and the total
    unpacked size is capped, so a hostile archive is refused rather than unpacked.
    """

    def __init__(self, scratch: Path, max_bytes: int):
        self.scratch = scratch
        self.max_bytes = max_bytes
        self.unpacked = 0
        self.listed = 0
        self._archives: list[zipfile.ZipFile] = []

    def close(self) -> None:
        for archive in self._archives:
            archive.close()

    def on_disk(self, members: Iterable[Member]) -> list[Path]:
        """The files on disk that ``members`` are read from: loose files, and the zips
        they came from (not the nested zips unpacked into scratch)."""
        loose = [member.path for member in members if member.path is not None]
        scratch = Path(self.scratch).resolve()
        zips = [Path(archive.filename) for archive in self._archives
                if scratch not in Path(archive.filename).resolve().parents]
        return loose + zips

    def collect(self, paths: Iterable[Path]) -> list[Member]:
        members: list[Member] = []
        for path in paths:
            path = Path(path)
            if path.is_dir():
                for file in files_under(path):
                    members.extend(self._file(file, str(file.relative_to(path.parent))))
            elif path.is_file():
                members.extend(self._file(path, path.name))
            elif path.is_symlink():
                raise PipelineError(f"{path} is a broken link (to {os.readlink(path)}, which does not exist)")
            elif path.exists():
                raise PipelineError(f"{path} is neither a file nor a folder (a device or a pipe?)")
            else:
                raise PipelineError(f"{path}: no such file or folder")
        return members

    def _file(self, path: Path, origin: str) -> list[Member]:
        if path.suffix.lower() == ".zip":
            return self._zip(path, origin)
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # a broken link: listed, so that reading it reports it
            size = 0
        return [Member(origin, path.name, size, lambda p=path: open(p, "rb"), path)]

    def _zip(self, path: Path, origin: str, depth: int = 1) -> list[Member]:
        if depth > MAX_NESTING:  # a zip that holds itself (a "zip quine") would never end
            raise PipelineError(f"{shown(origin, 200)}: zips nested more than {MAX_NESTING} deep; refusing this "
                                f"archive (it may be malicious)")
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise PipelineError(f"{shown(origin, 200)}: not a readable zip ({shown(error)})") from None
        self._archives.append(archive)
        infos = [info for info in archive.infolist() if not info.is_dir()]
        self.listed += len(infos)
        if self.listed > MAX_MEMBERS:
            raise PipelineError(f"{shown(origin, 200)}: archives list more than {MAX_MEMBERS:,} files; refusing to "
                                f"unpack them (a HAM10000 copy has about 20,000)")
        for info in infos:
            check_member_name(origin, info.filename)
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
                    shutil.copyfileobj(source, target, 1 << 20)
                members.extend(self._zip(nested, inner, depth + 1))
            else:
                members.append(Member(inner, name, info.file_size,
                                      lambda a=archive, i=info: a.open(i)))
        return members

    def materialize(self, member: Member) -> Path:
        """A path on disk holding ``member`` (extracted into scratch if it is in a zip)."""
        if member.path is not None:
            return member.path
        target = Path(tempfile.mkdtemp(dir=self.scratch)) / member.name
        try:
            with member.open() as source, open(target, "wb") as copy:  # streamed: memory stays at one chunk
                shutil.copyfileobj(source, copy, 1 << 20)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise PipelineError(f"{member.origin} cannot be read from its zip ({error}); the archive is damaged: "
                                f"copy it again") from None
        return target

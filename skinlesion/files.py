"""Atomic, byte-stable file output, and hashing.

Every output is written to a temporary name beside its target and renamed into
place, so an interrupted stage never leaves a truncated file behind. Outputs get
the permissions of any new file (0644 and 0755 under umask 022): the temporary
names are created with open/mkdir, which honour the umask, not with mkstemp and
mkdtemp, which make them private (0600, 0700).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
TEMPORARY_SUFFIXES = (".tmp", ".scratch")  # both git-ignored (.gitignore: .*.tmp, .*.scratch)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove the temporary names beside ``path`` that a killed process left behind
    (``.NAME.PID-TOKEN.tmp`` and ``.scratch`` whose PID is gone). A running writer's are
    kept. Returns what was removed."""
    removed = []
    prefix = f".{path.name}."
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        name = sibling.name
        suffix = next((s for s in TEMPORARY_SUFFIXES if name.endswith(s)), None)
        if suffix is None or not name.startswith(prefix):
            continue
        pid = name[len(prefix):-len(suffix)].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def _temporary(path: Path, create: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """A new, unused name beside ``path``, created by ``create``, after removing what a
    killed earlier run left there. The name holds this process's id, so the next run
    knows a leftover from a writer still at work. An error names the folder, which the
    user can fix, not the temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    while True:
        candidate = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise type(error)(error.errno, error.strerror, str(path.parent)) from None


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _name_full_disk(path: Path, error: OSError) -> None:
    """Raise ``error`` naming ``path`` if it is a full disk that names nothing: a
    write() knows no file name, and "no space left" alone does not say where."""
    if error.errno in FULL and error.filename is None:
        raise OSError(error.errno, error.strerror, str(path)) from error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    tmp = _temporary(path, _new_file)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        _name_full_disk(path, error)
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` on success."""
    path = Path(path)
    tmp = _temporary(path, lambda candidate: os.mkdir(candidate, 0o777))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as error:
        _name_full_disk(path, error)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def scratch_dir(beside: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder next to ``beside`` (``.NAME.PID-TOKEN.scratch``), removed at the
    end; one that a killed run left is removed by the next."""
    tmp = _temporary(Path(beside), lambda candidate: os.mkdir(candidate, 0o777), suffix=".scratch")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reserve(path: Path) -> None:
    """Allocate the disk space of ``path`` (a sparse file, e.g. a new memory map) now,
    so that a full disk is an OSError here rather than a crash (SIGBUS) later."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as error:
            if error.errno in FULL:
                raise
            # EINVAL, EOPNOTSUPP: a file system that cannot reserve space; write as before.


def write_json(path: str | os.PathLike, obj, sort_keys: bool = True) -> None:
    """``sort_keys=False`` keeps the caller's order, e.g. a metrics file's headline first."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every text cell that a spreadsheet would run as a formula (a file
    named ``=HYPERLINK(...).jpg``, say) led by an apostrophe, which shows it as text."""
    safe = frame.copy()
    for column in safe.columns:
        if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = [f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value
                            for value in safe[column]]
    return safe


def write_csv(path: str | os.PathLike, frame: pd.DataFrame, for_people: bool = False) -> None:
    """``for_people``: a table people open in a spreadsheet, its text cells made
    ``spreadsheet_safe`` (the pipeline's own tables are written as they are)."""
    with atomic_path(path) as tmp:
        (spreadsheet_safe(frame) if for_people else frame).to_csv(tmp, index=False, lineterminator="\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stable_seed(*parts) -> int:
    """A 32-bit seed derived from ``parts``, equal across processes and platforms
    (unlike ``hash()``), so each augmented copy's randomness is independent of order."""
    text = "\x1f".join(str(part) for part in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")

"""What comes from outside is checked where it enters: names (a server's file listing,
an archive member, an upload, a model file's fields), sizes (capped while reading, not
after) and outputs (never written over an input).

The caps, stated in the README's robustness notes:

- one image or mask file: ``MAX_FILE_BYTES`` (128 MiB), read at most that far;
- one decoded image: ``MAX_PIXELS`` (40 megapixels, 6,000 x 6,600 say), checked before
  its pixels are decoded (a JPEG is checked at the reduced scale it is decoded at);
- one file name: ``MAX_NAME`` characters, a single path component, no control
  characters.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path

from skinlesion import PipelineError

MAX_FILE_BYTES = 128 * 2**20
MAX_PIXELS = 40_000_000
MAX_NAME = 255
SHOWN_CHARS = 80


class TooLarge(PipelineError):
    """A file, member or body past its cap."""


def escaped(text: str) -> str:
    """``text`` with its control characters (a terminal's escape codes, a newline that
    would forge a log line) written as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(text, limit: int = SHOWN_CHARS) -> str:
    """``text`` as it may be printed: escaped, and cut to ``limit`` characters."""
    text = str(text)
    return escaped(text[:limit]) + ("..." if len(text) > limit else "")


def first_line(error: BaseException) -> str:
    """What an error says, in one line for a one-line refusal: its first non-empty line
    (after torch's "Error(s) in loading ..." header, which says nothing), escaped; its
    type's name when its message is empty."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    return escaped(lines[0]) if lines else type(error).__name__


def _problem(part: str) -> str | None:
    if not part:
        return "it is empty"
    if part in (".", ".."):
        return f"'{part}' names a folder, not a file"
    if "/" in part or "\\" in part:
        return "it holds a path separator"
    if re.match(r"^[A-Za-z]:", part):
        return "it starts with a drive letter"
    if any(not c.isprintable() for c in part):
        return "it holds control characters"
    if len(part) > MAX_NAME:
        return f"it is longer than {MAX_NAME} characters"
    return None


def file_name(name, what: str) -> str:
    """``name`` if it is one plain file name (no folders, not '..', no control
    characters); else a PipelineError naming ``what`` gave it."""
    if not isinstance(name, str):
        raise PipelineError(f"{what}: the file name {shown(name)!r} is not text; refusing it")
    problem = _problem(name)
    if problem:
        raise PipelineError(f"{what}: refusing the file name '{shown(name)}' ({problem}): it could write "
                            f"outside the folder meant for it")
    return name


def member_path(name: str, what: str) -> str:
    """An archive member's path, normalised, if it stays inside the folder it would be
    extracted to; else a PipelineError (the archive may be malicious)."""
    normalized = posixpath.normpath(name.replace("\\", "/"))
    parts = normalized.split("/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized) or ".." in parts:
        raise PipelineError(f"{what}: member '{shown(name)}' points outside the folder it would be extracted "
                            f"to; refusing this archive (it may be malicious)")
    if "\0" in normalized:  # no file system takes it; other control characters are shown escaped
        raise PipelineError(f"{what}: member '{shown(name)}' holds a NUL character; refusing this archive (it "
                            f"may be malicious)")
    return normalized


def inside(folder: Path, name, what: str) -> Path:
    """``folder / name`` for an outside ``name``, checked to be a plain file name that,
    resolved, lies in ``folder``."""
    path = Path(folder) / file_name(name, what)
    if Path(folder).resolve() not in path.resolve().parents:
        raise PipelineError(f"{what}: '{shown(name)}' would be written outside {folder}; refusing it")
    return path


def read_capped(handle, limit: int, what: str) -> bytes:
    """Read ``handle`` to its end, but never past ``limit`` bytes (TooLarge)."""
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{what} is larger than {limit / 2**20:.0f} MiB, the cap for one file; refusing to read it")
    return data


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def refuse_overwrite(out: Path, inputs: Iterable[Path | None], option: str = "-o") -> None:
    """Refuse ``out`` if it is (by resolved path or by inode: a hard link, a symbolic
    link) one of the files this run reads."""
    out = Path(out)
    target = _identity(out)
    resolved = out.resolve()
    for path in inputs:
        if path is None:
            continue
        path = Path(path)
        if path.resolve() == resolved or (target is not None and _identity(path) == target):
            raise PipelineError(f"{option} {shown(out)} is {shown(path)}, one of this run's inputs; writing there "
                                f"would destroy it: choose another {option}")

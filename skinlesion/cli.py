"""Entry points shared by the stage scripts and the prediction command: params in,
one-line errors out.

A problem the user can fix (bad input, a bad option, a full disk, a file they cannot
read) ends the run with one line saying what is wrong, where, and how to fix it. Exit
codes: 1 for a failed run, 2 for bad usage (the prediction command's bad option, model
file or input), 130 for Ctrl-C. A genuine bug keeps its traceback, followed by one
line asking to report it. Outputs are written atomically, so no error leaves a
half-written file.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

from skinlesion import PipelineError, params
from skinlesion.untrusted import first_line

log = logging.getLogger("skinlesion")

FAILED, USAGE, INTERRUPTED = 1, 2, 130
REPORT = "this is a bug in skinlesion, not a problem with your input: please report it with the traceback above"


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error (exit 2)."""

    def error(self, message):
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(USAGE)


def describe(error: BaseException, missing_hint: str = "check the path") -> str | None:
    """One line for an error that a bad environment or bad input causes, or None for
    one that only a bug can (it keeps its traceback)."""
    if isinstance(error, MemoryError):
        return "out of memory; close other programs, or lower the batch size or image size"
    if not isinstance(error, OSError):
        return None
    where = error.filename
    named = f"{where}: " if where is not None else ""
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device{f' writing {where}' if where else ''}; free space on that disk (or " \
               f"write somewhere else) and run again"
    if code == errno.EFBIG:
        return f"{named}file too large for its file system; write it somewhere else"
    if code in (errno.EACCES, errno.EPERM):
        return f"{named}permission denied; give this user access to it, or use another location"
    if code == errno.EROFS:
        return f"{named}read-only file system; write somewhere else"
    if code == errno.ENOENT:
        return f"{named}no such file or folder; {missing_hint}"
    if code == errno.EISDIR:
        return f"{where} is a folder, not a file; name a file"
    if code == errno.ENOTDIR:
        return f"{named}part of this path is a file, not a folder; check the path"
    if code in (errno.EMFILE, errno.ENFILE):
        return "too many open files; raise the limit (`ulimit -n 4096`) and run again"
    if code == errno.ELOOP:
        return f"{named}too many levels of symbolic links (a link loop?); fix the link"
    if code == errno.EIO:
        return f"{named}input/output error; the disk or network share failed: check it and run again"
    return f"{named}{error.strerror or error}; check the disk, share or network, and run again"


def guarded(prefix: str, work: Callable[[], int | None], *, input_error: int = FAILED,
            missing_hint: str = "check the path") -> int:
    """Run ``work`` and return its exit code, turning the errors a user can fix into
    one line on stderr (``prefix`` first); a PipelineError exits ``input_error``."""
    try:
        return work() or 0
    except PipelineError as error:
        print(f"error: {prefix}{error}", file=sys.stderr)
        return input_error
    except KeyboardInterrupt:
        print(f"error: {prefix}interrupted; no partial output was kept", file=sys.stderr)
        return INTERRUPTED
    except (OSError, MemoryError) as error:
        line = describe(error, missing_hint)
        print(f"error: {prefix}{line}", file=sys.stderr)
        return FAILED
    except Exception:  # noqa: BLE001 - a bug: its traceback, then what to do about it
        traceback.print_exc()
        print(f"error: {prefix}{REPORT}", file=sys.stderr)
        return FAILED


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Which of params.yaml and dvc.yaml does not parse, and where."""
    for name in ("params.yaml", "dvc.yaml"):
        try:
            params.parse_yaml(Path(name).read_text(encoding="utf-8"))
        except yaml.YAMLError as broken:
            return f"{name} is not valid YAML ({params.yaml_problem(broken)}); fix it"
        except OSError:
            continue
    return f"a YAML file does not parse ({first_line(error)}); fix it"


def run_stage(stage: str, main: Callable[[params.Declared], None]) -> None:
    """Run ``main`` with the params ``stage`` declares, and exit as ``guarded`` says:
    1 with one line for a problem the user can fix, 130 on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def work() -> None:
        try:
            main(params.load(stage))
        except yaml.YAMLError as error:
            raise PipelineError(_yaml_problem(error)) from None

    code = guarded(f"{stage}: ", work, missing_hint=f"`dvc repro {stage}` runs the stages it needs first")
    if code:
        sys.exit(code)

"""Long work: progress bars in one style, and worker threads that stop at Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm


def bar(iterable=None, **kwargs):
    """A tqdm bar on stderr; SKINLESION_PROGRESS=0 turns bars off (e.g. in logs)."""
    kwargs.setdefault("disable", os.environ.get("SKINLESION_PROGRESS", "1") == "0")
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def threads(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool that, on Ctrl-C or an error, drops the work not yet started: a
    plain ``with ThreadPoolExecutor`` runs every queued task (a whole folder of
    images) before the interruption gets through."""
    pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

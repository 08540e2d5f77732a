"""Progress bars for long work, one style everywhere."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def bar(iterable=None, **kwargs):
    """A tqdm bar on stderr; SKINLESION_PROGRESS=0 turns bars off (e.g. in logs)."""
    kwargs.setdefault("disable", os.environ.get("SKINLESION_PROGRESS", "1") == "0")
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)

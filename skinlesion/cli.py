"""Entry point shared by the stage scripts: params in, one-line errors out."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from skinlesion import PipelineError, params

log = logging.getLogger("skinlesion")


def run_stage(stage: str, main: Callable[[params.DeclaredParams], None]) -> None:
    """Run ``main`` with the params ``stage`` declares; exit 1 with one line on a
    PipelineError, 130 on Ctrl-C. Outputs are written atomically, so neither leaves
    a half-written file."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        main(params.load(stage))
    except PipelineError as error:
        print(f"error: {stage}: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: {stage}: interrupted; no partial output was kept", file=sys.stderr)
        sys.exit(130)

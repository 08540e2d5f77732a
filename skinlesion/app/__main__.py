"""``python -m skinlesion.app MODEL``: serve the page for MODEL until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from skinlesion import PipelineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skinlesion.app",
                                     description="A local page that shows a model's answer and Grad-CAM for dropped images.")
    parser.add_argument("model", type=Path, help="a model file (models/model.pt); Grad-CAM needs the PyTorch one")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a name the page may be opened by besides its address and localhost (repeatable); "
                             "other names are refused, against DNS rebinding")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("SKINLESION_PROGRESS", "0")  # one image per request: a progress bar is noise
    from skinlesion.app import server  # after the arguments, so --help does not wait for torch

    try:
        httpd = server.serve(args.model, args.host, args.port, tuple(args.allow_host))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port} ({error.strerror or error}); "
              f"choose another --port", file=sys.stderr)
        return 2
    host, port = httpd.server_address[:2]
    print(f"serving {args.model} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

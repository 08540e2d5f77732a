"""The page's server: one model, loaded once, answering one image per request.

Every request is handled inside its own ``try``: a file that is not an image gets the
prediction command's one-line message, anything unexpected a JSON error, and the
server goes on. The model is used by one request at a time (Grad-CAM hooks and
gradients live on the shared model).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import socket
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from io import BytesIO
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import torch
from PIL import Image

from skinlesion import modelfile, plots
from skinlesion.data import archives, patient
from skinlesion.data.images import decode_all
from skinlesion.data.patient_input import MAX_AGE, describe_problem
from skinlesion.evaluation import explain, inference
from skinlesion.untrusted import MAX_NAME, shown

log = logging.getLogger("skinlesion.app")
MAX_UPLOAD = 20 * 2**20  # bytes per request (one image); HAM10000's JPEGs are about 0.3 MB
NOTICE = "Research tool, not a diagnosis."
# Memory is bounded by what is admitted at once: ADMITTED uploads held (20 MB each at most),
# of which DECODERS are decoded at a time (each within the pixel cap of skinlesion.untrusted);
# the model scores one at a time. A request past ADMITTED is told to try again (503).
ADMITTED = 8
DECODERS = 2
BACKLOG = 128  # connections the kernel queues before accept (socketserver's default is 5)
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def png_data_url(pixels: np.ndarray) -> str:
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Analyst:
    """The model file and what the page shows for one uploaded file."""

    def __init__(self, model_path: Path):
        self.model, self.info = modelfile.load(model_path)
        self.predictor = inference.TorchPredictor(self.model, self.info)
        # the metadata encoding of a model that takes it
        self.patient = None if self.info.patient is None else self.info.patient.model_dump()
        self.scoring = self.predictor.scoring
        self.lock = threading.Lock()
        self.admitted = threading.BoundedSemaphore(ADMITTED)
        self.decoders = threading.BoundedSemaphore(DECODERS)

    def describe(self) -> dict:
        members = self.info.members
        architecture = self.info.architecture if not members else \
            f"ensemble of {len(members)} ({', '.join(member.architecture for member in members)})"
        return {"architecture": architecture, "classes": list(self.info.classes),
                "image_size": self.info.image_size, "tta": self.scoring["tta"],
                "mel_threshold": self.scoring.get("mel_threshold"), "notice": NOTICE,
                "patient": None if not self.patient else {"sex": list(self.patient["sex"]), "max_age": MAX_AGE,
                                                          "localization": list(self.patient["localization"])}}

    def analyse(self, name: str, data: bytes, age: str = "", sex: str = "", site: str = "") -> dict:
        """Probabilities, prediction, melanoma flag and Grad-CAM overlay for one file,
        or ``{"error": ...}`` worded as the prediction command words it. ``age``, ``sex``
        and ``site``: the patient's, for a model that takes them (blank: unknown)."""
        rows, given = None, None
        if self.patient:
            problem = describe_problem(age, sex, site, self.patient)
            if problem:
                return {"file": name, "error": f"{name}: {problem}"}
            given = {"age": age.strip(), "sex": sex.strip().lower() or "unknown",
                     "localization": site.strip().lower() or "unknown"}
            rows = patient.encode(pd.DataFrame([given]), self.patient)
        member = archives.Member(origin=name, name=name, size=len(data), open=lambda: BytesIO(data))
        with self.decoders:
            _, pixels, errors = decode_all([member], self.info.image_size)
        if errors:
            return {"file": name, "error": errors[0]}
        classes = list(self.info.classes)
        with self.lock:
            _, probabilities, scores = self.predictor.answer(pixels, patient=rows)
            in_scope = self.predictor.in_scope(scores)
            probabilities = probabilities[0]
            predicted = int(probabilities.argmax())
            # The scored prediction is the target, as in the explain stage.
            cams, _ = explain.member_heatmaps(self.model, inference.normalise(pixels, self.info, "cpu"),
                                              method="gradcam", target=torch.tensor([predicted]),
                                              patient=None if rows is None else torch.from_numpy(rows))
        result = {"file": name, "patient": given, "predicted": classes[predicted],
                  "confidence": float(probabilities[predicted]),
                  "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probabilities)},
                  "image": png_data_url(pixels[0]), "overlay": png_data_url(plots.overlay(pixels[0], cams[0])),
                  "melanoma": None, "in_scope": None if in_scope is None else bool(in_scope[0]),
                  "scope_score": None if scores is None else round(float(scores[0]), 4)}
        flags = self.predictor.melanoma_flags(probabilities[None])
        if flags is not None:  # no flag for an image out of scope
            result["melanoma"] = {"probability": float(probabilities[classes.index("mel")]),
                                  "threshold": float(self.scoring["mel_threshold"]),
                                  "flag": bool(flags[0]) and result["in_scope"] is not False}
        return result


def _file_name(header: str | None) -> str:
    """The uploaded file's own name (the browser sends it percent-encoded), no folders."""
    name = unquote(header or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(c for c in name if c.isprintable())[:MAX_NAME]
    return name if name not in ("", ".", "..") else "upload"


class Handler(BaseHTTPRequestHandler):
    server_version = "skinlesion-app"
    timeout = 60  # seconds a connection may stall (a body promised and never sent) before it is dropped
    analyst: Analyst  # set on the subclass that serve() makes
    allowed_hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _host_refused(self) -> bool:
        """Answer 403 to a request whose Host is a name this server does not go by: a page
        elsewhere whose name was rebound to this machine's address (DNS rebinding) may
        not read its answers. Addresses written as numbers are always this server's."""
        host = (self.headers.get("Host") or "").strip()
        if not host or host_allowed(host, self.allowed_hosts):
            return False
        self.close_connection = True
        self._json(HTTPStatus.FORBIDDEN, {"error": f"Host '{shown(host, 60)}' is not a name of this server; open it by "
                                                   f"its address (http://127.0.0.1:PORT/), or start it with "
                                                   f"--allow-host NAME"})
        return True

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        try:
            if self._host_refused():
                return
            if self.path in ("/", "/index.html"):
                page = resources.files("skinlesion.app").joinpath("page.html").read_bytes()
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif self.path == "/api/info":
                self._json(HTTPStatus.OK, self.analyst.describe())
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})
        except Exception as error:  # noqa: BLE001 - the server outlives any one request
            self._failed(error)

    def do_POST(self) -> None:  # noqa: N802
        try:
            if self._host_refused():
                return
            if self.path != "/api/predict":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {shown(self.path)}"})
                return
            if not self.analyst.admitted.acquire(blocking=False):
                self._busy()
                return
            try:
                self._predict()
            finally:
                self.analyst.admitted.release()
        except Exception as error:  # noqa: BLE001
            self._failed(error)

    def _busy(self) -> None:
        length = self.headers.get("Content-Length")
        self._discard(int(length) if length and length.isdigit() else 0)
        self.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
        body = json.dumps({"error": f"the server is busy with {ADMITTED} images; try again in a moment"}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Retry-After", "1")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _predict(self) -> None:
        name = _file_name(self.headers.get("X-File-Name"))
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._json(HTTPStatus.LENGTH_REQUIRED, {"file": name, "error": f"{name}: upload without a length"})
            return
        if int(length) > MAX_UPLOAD:
            self._discard(int(length))
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"file": name, "error": f"{name}: {int(length) / 2**20:.1f} MB is over the "
                                               f"{MAX_UPLOAD // 2**20} MB limit per image"})
            return
        data = self.rfile.read(int(length))
        result = self.analyst.analyse(name, data, *(unquote(self.headers.get(f"X-{field}") or "")
                                                    for field in ("Age", "Sex", "Site")))
        self._json(HTTPStatus.UNPROCESSABLE_ENTITY if "error" in result else HTTPStatus.OK, result)

    def _discard(self, length: int) -> None:
        """Read and drop a refused body, so the client (still sending) gets the answer
        rather than a broken pipe; past a few times the limit, hang up instead."""
        self.close_connection = True  # nothing of it may be taken for a next request
        if length <= 4 * MAX_UPLOAD:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)

    def _failed(self, error: Exception) -> None:
        log.error("error: %s %s failed:\n%s", self.command, self.path, traceback.format_exc())
        try:
            self.close_connection = True
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the server failed on this request "
                                                                   f"({type(error).__name__}: {error})"})
        except OSError:
            pass  # the browser has gone

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for a browser's open connection
    request_queue_size = BACKLOG


class Server6(Server):
    address_family = socket.AF_INET6


def host_allowed(header: str, names: frozenset[str]) -> bool:
    """Whether a Host header (``name``, ``name:port``, ``[v6]:port``) names this server:
    an address written as numbers, or one of ``names``."""
    header = header.strip().lower()
    if header.startswith("["):
        bare = header[1:].split("]", 1)[0]
    else:
        bare = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    try:
        ipaddress.ip_address(bare)
        return True
    except ValueError:
        return bare.rstrip(".") in names


def serve(model_path: Path, host: str = "127.0.0.1", port: int = 8000, allow_hosts: tuple[str, ...] = ()) -> Server:
    """A server bound to ``host``:``port`` (not yet serving) for the model file. It answers
    requests for its addresses, the loopback names, the name it is bound to, this machine's
    own names when bound to every address, and ``allow_hosts``."""
    analyst = Analyst(Path(model_path))
    names = {*LOOPBACK_NAMES, *(name.lower() for name in allow_hosts), host.lower()}
    if host in ("", "0.0.0.0", "::"):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    handler = type("BoundHandler", (Handler,), {"analyst": analyst, "allowed_hosts": frozenset(names)})
    return (Server6 if ":" in host else Server)((host, port), handler)

"""The progress endpoint of a worker pod and its final report.

Local rank 0 of every pod runs a :class:`ProgressServer` on a background thread:

* ``GET /status``  -> the current :class:`loco_contract.protocol.ProgressReport` as JSON;
* ``GET /metrics`` -> the Prometheus text of :class:`loco_trainer.metrics.TrainerMetrics`;
* ``GET /ready``   -> 200 while the worker trains (state ``running``), 503 otherwise (starting,
  finished, failed): the pod's readinessProbe, so a pod is Ready when its trainer is training;
* ``POST /membership`` -> a :class:`loco_contract.protocol.MembershipUpdate` from the operator (a live
  resize, docs/elastic.md): kept in the state until the training loop switches to it. It needs the job's
  membership token (``Authorization: Bearer``; 401 without, 403 when the worker has none) and a body of
  at most :data:`MAX_MEMBERSHIP_BODY` bytes (413).
* ``POST /checkpoint`` -> a :class:`loco_contract.protocol.CheckpointRequest` (the operator is about to stop the
  workers: save where you are): held until the training loop's next agreement on it. Same token and size rules.

The state moves starting -> running -> finished | failed. When the trainer exits it writes the
final report to the termination message file (:func:`write_termination_message`).
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from loco_contract.config import TERMINATION_MESSAGE_PATH, RuntimeEnv
from pydantic import ValidationError

from loco_contract.protocol import (
    CHECKPOINT_PATH,
    MEMBERSHIP_PATH,
    METRICS_PATH,
    READY_PATH,
    STATUS_PATH,
    CheckpointRequest,
    CollectiveSummary,
    LinkSummary,
    MembershipUpdate,
    ProgressReport,
    WorkerState,
)

log = logging.getLogger(__name__)

#: a membership update is a few numbers and a host name: anything longer is not one
MAX_MEMBERSHIP_BODY = 16 * 1024
#: seconds a client may take to send its request (a slow sender holds one thread, never the loop)
REQUEST_TIMEOUT_S = 10.0


def utc_now() -> str:
    """Current time, RFC 3339 UTC."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class ProgressState:
    """Thread-safe holder of the pod's current :class:`ProgressReport` (the loop writes, the
    HTTP thread reads)."""

    def __init__(self, report: ProgressReport) -> None:
        self._lock = threading.Lock()
        self._report = report
        self._fault_source: FaultSource | None = None
        self._membership: MembershipUpdate | None = None
        self._membership_changed = threading.Condition(self._lock)
        self._membership_listener: Callable[[MembershipUpdate], None] | None = None
        #: checkpoint requests: the one not yet taken by the loop, and every id seen (a repeat is one save)
        self._checkpoint_request: CheckpointRequest | None = None
        self._checkpoint_ids: set[str] = set()

    # ------------------------------------------------------------------ checkpoint requests

    def offer_checkpoint_request(self, request: CheckpointRequest) -> int:
        """Hold ``request`` for the loop. Returns the HTTP status: 202 new, 200 an id held or taken already."""
        with self._lock:
            if request.id in self._checkpoint_ids:
                return 200
            if len(self._checkpoint_ids) >= 1024:  # ids are per stop: a worker sees a few in its life
                self._checkpoint_ids.clear()
            self._checkpoint_ids.add(request.id)
            self._checkpoint_request = request
            return 202

    def take_checkpoint_request(self) -> CheckpointRequest | None:
        """The request not yet taken, or None; taking it clears it."""
        with self._lock:
            request, self._checkpoint_request = self._checkpoint_request, None
            return request

    # ------------------------------------------------------------------ membership updates

    def offer_membership(self, update: MembershipUpdate) -> int:
        """Keep ``update`` if it is newer than the epoch the worker runs in and than any update held.
        Returns the HTTP status: 202 kept, 200 already held (same epoch), 409 older than what the
        worker runs in or holds (the body says which)."""
        with self._lock:
            running, held = self._report.epoch, self._membership.epoch if self._membership is not None else None
            if update.epoch < running or (held is not None and update.epoch < held):
                return 409
            if update.epoch == running or update.epoch == held:
                return 200
            self._membership = update
            self._membership_changed.notify_all()
            listener = self._membership_listener
        if listener is not None:
            listener(update)
        return 202

    def on_membership(self, listener: "Callable[[MembershipUpdate], None] | None") -> None:
        """Call ``listener(update)`` (on the HTTP thread) whenever a new update is kept."""
        self._membership_listener = listener

    def pending_membership(self) -> MembershipUpdate | None:
        """The newest update held whose epoch is above the one the worker runs in, or None."""
        with self._lock:
            m = self._membership
            return m if m is not None and m.epoch > self._report.epoch else None

    def wait_membership(self, min_epoch: int, timeout_s: float) -> MembershipUpdate | None:
        """Block until an update with ``epoch >= min_epoch`` is held (then return it), or ``timeout_s`` passed (None)."""
        with self._membership_changed:
            self._membership_changed.wait_for(
                lambda: self._membership is not None and self._membership.epoch >= min_epoch, timeout_s)
            m = self._membership
            return m if m is not None and m.epoch >= min_epoch else None

    def set_fault_source(self, source: "FaultSource | None") -> None:
        """Where :meth:`snapshot` takes collective records and probe samples from:
        ``source(since_seq, since_link) -> (collectives, links, clock_error_s)``, in the protocol's shape
        (``Comm.export_records``/``export_links``: the flight recorder's). Called on the HTTP thread."""
        self._fault_source = source

    def worker_state(self) -> WorkerState:
        """The report's ``state`` (what ``GET /ready`` answers from), without building a report."""
        with self._lock:
            return self._report.state

    def update(self, **fields: Any) -> None:
        """Replace the given fields (snake_case names of ProgressReport)."""
        with self._lock:
            self._report = self._report.model_copy(update=fields)

    def snapshot(self, since_seq: int | None = None, since_link: int | None = None) -> ProgressReport:
        """The current report, stamped with the current time. With ``since_seq``/``since_link``
        (the operator's cursors) and a fault source set, it also carries the records after them."""
        with self._lock:
            report = self._report.model_copy(update={"time": utc_now()})
        source = self._fault_source
        if source is not None and (since_seq is not None or since_link is not None):
            collectives, links, clock_error = source(
                -1 if since_seq is None else since_seq, -1 if since_link is None else since_link
            )
            report = report.model_copy(update={
                "collectives": list(collectives),
                "links": list(links),
                "clock_error_s": clock_error,
            })
        return report


#: ``(since_seq, since_link) -> (collective wire dicts, link wire dicts, clock error seconds or None)``
FaultSource = Callable[[int, int], "tuple[list[CollectiveSummary], list[LinkSummary], float | None]"]


def _cursor(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        return None


def read_membership_token(env: RuntimeEnv) -> str | None:
    """The job's membership token from ``LOCO_MEMBERSHIP_TOKEN_FILE`` (None when unset); a file named but
    unreadable or empty is an error, never a worker that takes updates from anyone."""
    if not env.membership_token_file:
        return None
    path = env.resolve_path(env.membership_token_file)
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise RuntimeError(f"LOCO_MEMBERSHIP_TOKEN_FILE={env.membership_token_file}: cannot read it: {exc}") from exc
    if not token:
        raise RuntimeError(f"LOCO_MEMBERSHIP_TOKEN_FILE={env.membership_token_file}: the file is empty")
    return token


def membership_refusal(token: str | None, authorization: str | None, length: str | None,
                       what: str = "a membership update") -> tuple[int, str] | None:
    """Why a ``POST /membership`` (or another operator's ``POST``: ``what``) is refused before its body is read,
    or None to read it."""
    if token is None:
        return 403, (f"this worker takes no {what.split(' ', 1)[1]}s: it has no membership token "
                     "(LOCO_MEMBERSHIP_TOKEN_FILE, which the operator sets)")
    scheme, _, presented = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return 401, f"{what} needs the job's membership token (Authorization: Bearer)"
    try:
        size = int(length or "")
    except ValueError:
        return 411, f"{what} needs a Content-Length"
    if not 0 <= size <= MAX_MEMBERSHIP_BODY:
        return 413, f"{what} is at most {MAX_MEMBERSHIP_BODY} bytes, this one {size}"
    return None


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


def _handler(state: ProgressState, render_metrics: Callable[[], bytes],
             membership_token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            path, _, query_text = self.path.partition("?")
            if path == STATUS_PATH:
                query = urllib.parse.parse_qs(query_text)
                report = state.snapshot(_cursor(query, "sinceSeq"), _cursor(query, "sinceLink"))
                extra = {"collectives", "links", "clock_error_s"} if report.collectives is None else None
                body, ctype = report.model_dump_json(by_alias=True, exclude=extra).encode(), "application/json"
            elif path == METRICS_PATH:
                body, ctype = render_metrics(), "text/plain; version=0.0.4; charset=utf-8"
            elif path == "/healthz":
                body, ctype = b"ok", "text/plain"
            elif path == READY_PATH:
                worker_state = state.worker_state()
                if worker_state != WorkerState.running:
                    self.send_error(503, f"not training: {worker_state.value}")
                    return
                body, ctype = b"running", "text/plain"
            else:
                self.send_error(404, f"unknown path {path}; try {STATUS_PATH} or {METRICS_PATH}")
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            path = self.path.partition("?")[0]
            if path not in (MEMBERSHIP_PATH, CHECKPOINT_PATH):
                self._reply(404, {"error": f"unknown path {path}; POST {MEMBERSHIP_PATH} or {CHECKPOINT_PATH}"})
                return
            what = "a membership update" if path == MEMBERSHIP_PATH else "a checkpoint request"
            refusal = membership_refusal(membership_token, self.headers.get("Authorization"),
                                         self.headers.get("Content-Length"), what)
            if refusal is not None:
                self.close_connection = True  # the body, if any, is never read
                self._reply(refusal[0], {"error": refusal[1]})
                return
            length = int(self.headers["Content-Length"])
            body = self.rfile.read(length) if length else b""
            if path == CHECKPOINT_PATH:
                self._checkpoint_request(body)
                return
            try:
                update = MembershipUpdate.model_validate_json(body)
            except ValidationError as exc:
                self._reply(400, {"error": f"invalid membership update: {_problems(exc)} (expected JSON with epoch, "
                                           f"rank, worldSize, masterAddr, masterPort)"})
                return
            code = state.offer_membership(update)
            if code == 409:
                current = state.snapshot().epoch
                self._reply(409, {"error": f"epoch {update.epoch} is not newer than the epoch this worker runs in "
                                           f"({current}) or holds already"})
                return
            log.info("membership update: epoch %d, rank %d of %d, master %s:%d (%s)", update.epoch, update.rank,
                     update.world_size, update.master_addr, update.master_port, "new" if code == 202 else "held already")
            self._reply(code, {"accepted": True, "epoch": update.epoch})

        def _checkpoint_request(self, body: bytes) -> None:
            try:
                request = CheckpointRequest.model_validate_json(body)
            except ValidationError as exc:
                self._reply(400, {"error": f"invalid checkpoint request: {_problems(exc)} (expected JSON with id, reason)"})
                return
            code = state.offer_checkpoint_request(request)
            if code == 202:
                log.info("checkpoint requested (%s): saving at the next step the ranks agree on", request.reason or request.id)
            self._reply(code, {"accepted": True, "id": request.id})

        def _reply(self, code: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the operator polls often
            log.debug("progress endpoint: " + format, *args)

    return Handler


class ProgressServer:
    """HTTP server for ``/status`` and ``/metrics`` on a daemon thread. ``port`` 0 picks a free
    port (read :attr:`port` after :meth:`start`). ``membership_token``: what ``POST /membership`` must
    carry (None: it is refused)."""

    def __init__(self, state: ProgressState, render_metrics: Callable[[], bytes], host: str, port: int,
                 membership_token: str | None = None) -> None:
        self.state = state
        self._httpd = ThreadingHTTPServer((host, port), _handler(state, render_metrics, membership_token))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loco-progress", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self._httpd.server_address[:2]  # type: ignore[return-value]

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> "ProgressServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def termination_message_path(env: RuntimeEnv, path: str = TERMINATION_MESSAGE_PATH) -> str | None:
    """Where the final report goes, or None when it must not be written: under
    ``LOCO_LOCAL_ROOT`` in the embedded cluster (directories created), else the container path
    when its directory exists."""
    resolved = env.resolve_path(path)
    if env.local_root:
        return resolved
    return resolved if os.path.isdir(os.path.dirname(resolved)) else None


def write_termination_message(report: ProgressReport, env: RuntimeEnv, path: str = TERMINATION_MESSAGE_PATH) -> str | None:
    """Write ``report`` as JSON to the termination message file; returns the path written or None.
    Never raises: a failure to write is logged (the exit code still tells the story)."""
    target = termination_message_path(env, path)
    if target is None:
        return None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # Written in place, not tmp + rename: in a real pod the file is a bind mount.
        # Kubernetes keeps at most 4096 bytes of it; the report is far smaller.
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(report.model_dump_json(by_alias=True, exclude_none=True,
                                            exclude={"collectives", "links", "clock_error_s"}))
        return target
    except OSError as exc:
        log.warning("could not write the termination message to %s: %s", target, exc)
        return None

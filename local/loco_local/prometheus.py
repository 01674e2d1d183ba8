"""A real Prometheus next to the embedded cluster: ``loco local up --prometheus`` and ``e2e/test_prometheus.py``.

Runs the ``prometheus`` binary (Debian's package, 2.42: ``apt-get install prometheus``; ``make tools``
installs it) on loopback with its own data directory, scraping:

* ``loco-operator``: the operator's ``/metrics`` (static targets, ``host:port``);
* ``loco-workers``: every worker pod's ``http://<podIP>:8080/metrics``, discovered through a
  ``file_sd`` file that :class:`PodTargetFollower` rewrites from the live pod list.

Both jobs use ``honor_labels: true``: trainer and per-job operator series carry their own
``namespace``/``job`` labels (the TrainingJob), which must not be renamed ``exported_job``.

Pure pieces (:func:`worker_targets`, :func:`scrape_config`) build the files; :class:`Prometheus`
owns the process (a context manager that always stops it) and queries its HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

#: The worker pods' metrics port (the ``status`` container port of the pod contract).
WORKER_METRICS_PORT = 8080
#: Label selecting Loco worker pods.
WORKER_LABEL = "loco.dev/job"
INSTALL_HINT = "install Debian's prometheus package: apt-get install -y prometheus (or run 'make tools')"
#: Loco's alerting rules, shipped by the chart (docs/helm.md, "Alerts"); present in a source checkout.
ALERT_RULES = Path(__file__).resolve().parents[2] / "charts" / "loco-operator" / "alerts" / "loco.rules.yaml"


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or refused a query."""


def find_binary(name: str = "prometheus") -> str | None:
    """Path of the ``prometheus`` (or ``promtool``) binary on PATH, or None."""
    return shutil.which(name)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def worker_targets(pods: Iterable[Mapping[str, Any]], port: int = WORKER_METRICS_PORT) -> list[dict[str, Any]]:
    """file_sd target groups for the running Loco worker pods: one group per pod, ``IP:port``, with
    ``pod`` and ``pod_namespace`` labels. Pods without an IP, not Running, or being deleted are left out
    (Prometheus then marks their series stale)."""
    groups = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or status.get("phase") != "Running" or meta.get("deletionTimestamp"):
            continue
        if WORKER_LABEL not in (meta.get("labels") or {}):
            continue
        host = f"[{ip}]" if ":" in ip else ip
        groups.append({"targets": [f"{host}:{port}"],
                       "labels": {"pod": meta.get("name", ""), "pod_namespace": meta.get("namespace", "")}})
    return sorted(groups, key=lambda g: g["targets"][0])


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def scrape_config(operator_targets: Sequence[str], workers_file: Path, *, interval_s: float = 15.0,
                  rule_files: Sequence[Path] = ()) -> dict[str, Any]:
    """The Prometheus configuration: the operator job (static ``host:port`` targets) and the worker job
    (``file_sd`` from ``workers_file``), both with ``honor_labels``; ``rule_files`` (alerting rules, e.g.
    :data:`ALERT_RULES`) are evaluated every interval."""
    interval = f"{round(interval_s * 1000)}ms"  # Prometheus durations take integers only
    timeout = f"{round(min(interval_s, 10.0) * 800)}ms"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": timeout},
        **({"rule_files": [str(path) for path in rule_files]} if rule_files else {}),
        "scrape_configs": [
            {"job_name": "loco-operator", "honor_labels": True, "metrics_path": "/metrics",
             "static_configs": [{"targets": list(operator_targets)}]},
            {"job_name": "loco-workers", "honor_labels": True, "metrics_path": "/metrics",
             "file_sd_configs": [{"files": [str(workers_file)], "refresh_interval": interval}]},
        ],
    }


class PodTargetFollower:
    """A daemon thread keeping ``workers_file`` equal to :func:`worker_targets` of ``list_pods()``
    (every ``interval_s``; listing errors keep the previous file)."""

    def __init__(self, list_pods: Callable[[], Iterable[Mapping[str, Any]]], workers_file: Path, *,
                 interval_s: float = 1.0, port: int = WORKER_METRICS_PORT) -> None:
        self.list_pods, self.workers_file, self.interval_s, self.port = list_pods, Path(workers_file), interval_s, port
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: list[dict[str, Any]] = []

    def refresh(self) -> list[dict[str, Any]]:
        """Rewrite the file now (when the targets changed); returns the current target groups."""
        groups = worker_targets(self.list_pods(), self.port)
        if groups != self.last or not self.workers_file.exists():
            write_json_atomic(self.workers_file, groups)
            self.last = groups
        return groups

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the API may be briefly unreachable; try again next tick
                continue

    def start(self) -> "PodTargetFollower":
        if not self.workers_file.exists():
            write_json_atomic(self.workers_file, [])
        self._thread = threading.Thread(target=self._run, name="loco-prometheus-targets", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Prometheus:
    """One ``prometheus`` process on ``127.0.0.1:<port>`` with its data and config under ``workdir``.

    ``with Prometheus(workdir, ["127.0.0.1:9090"]) as prom: prom.query("up")``. The worker targets
    file is ``prom.workers_file`` (feed it with :class:`PodTargetFollower`).
    """

    def __init__(self, workdir: Path, operator_targets: Sequence[str], *, port: int = 0, interval_s: float = 1.0,
                 binary: str | None = None, retention: str = "1d", rule_files: Sequence[Path] = ()) -> None:
        self.workdir = Path(workdir)
        self.rule_files = list(rule_files)
        self.operator_targets = list(operator_targets)
        self.port = port or free_port()
        self.interval_s = interval_s
        self.binary = binary or find_binary()
        self.retention = retention
        self.workers_file = self.workdir / "workers.json"
        self.config_file = self.workdir / "prometheus.yml"
        self.log_file = self.workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout_s: float = 60.0) -> "Prometheus":
        """Write the config, start the process, wait until ``/-/ready``; raises :class:`PrometheusError`."""
        if not self.binary:
            raise PrometheusError(f"no prometheus binary on PATH: {INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.workers_file.exists():
            write_json_atomic(self.workers_file, [])
        self.config_file.write_text(yaml.safe_dump(scrape_config(self.operator_targets, self.workers_file,
                                                                 interval_s=self.interval_s, rule_files=self.rule_files),
                                                   sort_keys=False))
        cmd = [self.binary, f"--config.file={self.config_file}", f"--storage.tsdb.path={self.workdir / 'data'}",
               f"--storage.tsdb.retention.time={self.retention}", f"--web.listen-address=127.0.0.1:{self.port}",
               "--log.level=warn"]
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready within {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def wait(self) -> int:
        """Block until the process exits (the CLI's foreground mode); returns its exit code."""
        return -1 if self._proc is None else self._proc.wait()

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------- HTTP API

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>``; returns ``data``; raises :class:`PrometheusError` with Prometheus's
        ``errorType: error`` on a refused request (a PromQL parse error is a 400 with that body)."""
        url = f"{self.url}/api/v1/{path}?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
            except ValueError:
                raise PrometheusError(f"{path}: HTTP {exc.code}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query (``/api/v1/query``); returns the result list (vector samples, or a one-element
        list for a scalar)."""
        data = self.api("query", query=expr, time=None if at is None else f"{at:.3f}")
        result = data.get("result")
        if data.get("resultType") in ("scalar", "string"):
            return [{"value": result}]
        return list(result or [])

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        """Range query (``/api/v1/query_range``); returns the matrix (series with ``values``)."""
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step_s:g}")
        return list(data.get("result") or [])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (``/api/v1/targets``)."""
        return list(self.api("targets").get("activeTargets") or [])

"""The whole Loco stack on one machine: the embedded cluster plus a real operator process.

``make demo`` and the end-to-end tests use it::

    with LocalStack(state_dir, nodes=default_nodes(3)) as stack:
        stack.apply_file("examples/quickstart.yaml")
        job = stack.wait_for_phase("quickstart", {"Succeeded"}, timeout_s=600)

The operator runs as its own process (``loco operator run``), exactly as it would next to a real
cluster, so killing and restarting it (``stack.restart_operator()``) is a real operator restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from loco_local.cluster import LocalCluster
from loco_local.nodes import NodeSpec, uniform_nodes

TJ_GROUP, TJ_VERSION, TJ_PLURAL = "loco.dev", "v1alpha1", "trainingjobs"
#: the authorizer's words ('User "..." cannot list resource "x"') or a client call's 403 reason as logged
RBAC_DENIAL = re.compile(r'cannot [a-z]+ resource "|\bForbidden\b')


def default_nodes(count: int = 3, *, cpu: str = "4", memory: str = "16Gi", gpus: int = 0) -> list[NodeSpec]:
    """``count`` identical fake nodes named node-0, node-1, ... sized for the demo and the e2e tests."""
    return uniform_nodes(count, cpu=cpu, memory=memory, gpus=gpus)


#: the operator's pods, as the chart's NetworkPolicy peer names them (here the operator is a local process;
#: nothing enforces NetworkPolicy on one machine, the policy is made and its RBAC proven)
OPERATOR_PEER = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "loco-operator"}}}


class LocalStack:
    """Embedded cluster + operator process; a context manager that always cleans up."""

    def __init__(
        self,
        state_dir: Path,
        nodes: list[NodeSpec] | None = None,
        *,
        namespace: str = "default",
        operator_args: Iterable[str] = (),
        operator_env: dict[str, str] | None = None,
        control_plane: str = "embedded",
        cordon_nodes: bool = False,
    ) -> None:
        """``cordon_nodes``: the cluster operator lets jobs cordon a blamed node (``--cordon-nodes``; on the
        real control plane also the chart value ``faultIsolation.cordonNodes``, which grants ``patch`` on nodes)."""
        self.state_dir = Path(state_dir)
        self.cordon_nodes = cordon_nodes
        self.namespace = namespace
        self.control_plane = control_plane
        if control_plane == "kubernetes":
            from loco_local.realcluster import RealCluster

            self.cluster: LocalCluster = RealCluster(self.state_dir, nodes or default_nodes())
        elif control_plane == "embedded":
            self.cluster = LocalCluster(self.state_dir, nodes or default_nodes())
        else:
            raise ValueError(f"control_plane must be 'embedded' or 'kubernetes', got {control_plane!r}")
        self._operator_args = [*operator_args, *(["--cordon-nodes"] if cordon_nodes else []),
                               # as the chart runs it (networkPolicy.enabled): each job gets its NetworkPolicy
                               f"--network-policy={json.dumps([OPERATOR_PEER])}"]
        self._operator_env = dict(operator_env or {})
        self._operator: subprocess.Popen[bytes] | None = None
        self._operator_log_count = 0
        self._api: Any = None
        #: the operator's credential: the admin kubeconfig on the embedded cluster, the chart's
        #: ServiceAccount token on the real control plane
        self.operator_kubeconfig: Path | None = None
        self.chart: Any = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "LocalStack":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.cluster.__enter__()
        try:
            if self.control_plane == "kubernetes":
                self._install_chart()
            self.start_operator()
        except BaseException:
            self.cluster.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_operator()
        finally:
            self.cluster.__exit__(*exc)

    @property
    def kubeconfig(self) -> Path:
        return Path(self.cluster.kubeconfig)

    def _install_chart(self) -> None:
        """Real control plane: Helm installs the chart into ``loco-system`` (Pod Security ``restricted``), and the
        operator gets the chart's ServiceAccount token, so its every call passes the chart's RBAC or fails."""
        from loco_local.chart import NAMESPACE, ChartRelease

        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {
            f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")}}})
        self.chart = ChartRelease(self.state_dir, self.kubeconfig)
        # namespaced mode (a Role in the job namespace), as the operator here is told --namespace
        values: dict[str, Any] = {"watchNamespaces": [self.namespace]}
        if self.cordon_nodes:
            values["faultIsolation"] = {"cordonNodes": True}
        self.chart.install(values)
        cluster = self.cluster
        self.operator_kubeconfig = self.chart.operator_kubeconfig(cluster.url, cluster.control_plane.pki.ca_cert)

    def rbac_denials(self) -> list[str]:
        """The operator's log lines (all its runs) where the API refused it (403)."""
        lines = []
        for i in range(1, self._operator_log_count + 1):
            path = self.state_dir / f"operator-{i}.log"
            if path.exists():
                # any 403 counts: none is expected of an operator whose chart grants what it uses
                lines += [line for line in path.read_text(errors="replace").splitlines()
                          if RBAC_DENIAL.search(line)]
        return lines

    @property
    def operator_log(self) -> Path:
        return self.state_dir / f"operator-{self._operator_log_count}.log"

    def start_operator(self) -> None:
        """Start ``loco operator run`` against the cluster (a separate process, as in production)."""
        if self._operator is not None and self._operator.poll() is None:
            return
        self._operator_log_count += 1
        log = open(self.operator_log, "wb")  # noqa: SIM115 - owned by the child until it exits
        kubeconfig = self.operator_kubeconfig or self.kubeconfig
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1", **self._operator_env}
        cmd = [
            sys.executable, "-c", "import loco_cli; loco_cli.main()", "operator", "run",
            "--kubeconfig", str(kubeconfig), "--namespace", self.namespace, "--metrics-port", "0",
            *self._operator_args,
        ]
        self._operator = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def stop_operator(self, *, kill: bool = False) -> None:
        """Stop the operator: SIGTERM (graceful) or SIGKILL (``kill=True``, a crash)."""
        proc, self._operator = self._operator, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart_operator(self, *, kill: bool = True) -> None:
        self.stop_operator(kill=kill)
        self.start_operator()

    def operator_alive(self) -> bool:
        return self._operator is not None and self._operator.poll() is None

    # ------------------------------------------------------------------ API access

    @property
    def api(self) -> Any:
        """A ``kubernetes.dynamic.DynamicClient`` for the cluster."""
        if self._api is None:
            from kubernetes import config, dynamic
            from kubernetes.client import api_client

            client = config.new_client_from_config(config_file=str(self.kubeconfig))
            self._api = dynamic.DynamicClient(api_client.ApiClient(configuration=client.configuration))
        return self._api

    def resource(self, api_version: str, kind: str) -> Any:
        return self.api.resources.get(api_version=api_version, kind=kind)

    def apply_file(self, path: str | Path, *, namespace: str | None = None) -> list[dict[str, Any]]:
        """Create (or merge-patch) every object of a multi-document YAML file; returns the objects."""
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        return [self.apply(doc, namespace=namespace) for doc in docs]

    def apply(self, obj: dict[str, Any], *, namespace: str | None = None) -> dict[str, Any]:
        from kubernetes.dynamic.exceptions import ConflictError

        ns = namespace or obj.get("metadata", {}).get("namespace") or self.namespace
        res = self.resource(obj["apiVersion"], obj["kind"])
        try:
            return res.create(body=obj, namespace=ns).to_dict()
        except ConflictError:
            return res.patch(
                body=obj, name=obj["metadata"]["name"], namespace=ns, content_type="application/merge-patch+json"
            ).to_dict()

    def get_job(self, name: str) -> dict[str, Any] | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            return self.resource(f"{TJ_GROUP}/{TJ_VERSION}", "TrainingJob").get(name=name, namespace=self.namespace).to_dict()
        except NotFoundError:
            return None

    def list_pods(self, job: str | None = None) -> list[dict[str, Any]]:
        selector = f"loco.dev/job={job}" if job else None
        pods = self.resource("v1", "Pod").get(namespace=self.namespace, label_selector=selector)
        return [p.to_dict() for p in pods.items]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        selector = f"involvedObject.name={name}" if name else None
        items = self.resource("v1", "Event").get(namespace=self.namespace, field_selector=selector).items
        events = [e.to_dict() for e in items]
        return sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def wait_for_events(self, name: str, reason: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """The job's events with ``reason``, once there is one: Kopf posts events after the status they tell of."""
        return self.wait_for(lambda: [e for e in self.events(name) if e["reason"] == reason], timeout_s=timeout_s,
                             what=f"a {reason} event of {name}")

    def wait_for(
        self, predicate: Callable[[], Any], *, timeout_s: float, interval_s: float = 0.5, what: str = "condition"
    ) -> Any:
        """Poll ``predicate`` until it returns a truthy value; raise TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
            time.sleep(interval_s)

    def wait_for_phase(self, name: str, phases: set[str], *, timeout_s: float) -> dict[str, Any]:
        def current() -> dict[str, Any] | None:
            job = self.get_job(name)
            if job and (job.get("status") or {}).get("phase") in phases:
                return job
            return None

        return self.wait_for(current, timeout_s=timeout_s, what=f"TrainingJob {name} to reach {sorted(phases)}")

    def kubectl(self, *args: str, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the real ``kubectl`` against the cluster."""
        return subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True, text=True, check=check, timeout=timeout_s,
        )

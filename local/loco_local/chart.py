"""Loco's Helm chart on the real control plane: installed by a real Helm (``helm`` built from
helm.sh/helm/v4, ``make kube``), and the operator's credential issued by the API for the chart's
ServiceAccount (``TokenRequest``), so every call the operator makes is checked by the chart's RBAC.

The release runs no operator pod (``replicaCount: 0``): the node agents run pods as host processes and
cannot give one the in-cluster filesystem (``/var/run/secrets/...``) that the Kubernetes client reads.
The operator runs beside the cluster instead, as :class:`loco_local.stack.LocalStack` starts it, with
:meth:`ChartRelease.operator_kubeconfig` -- the ServiceAccount's token and nothing more.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from loco_local.apiserver.kubeconfig import write_tls_kubeconfig
from loco_local.controlplane import helm_binary

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "loco-operator"
RELEASE = "loco-operator"
NAMESPACE = "loco-system"
TOKEN_SECONDS = 24 * 3600


class ChartRelease:
    """One Helm release of the chart on a cluster reached with ``admin_kubeconfig``."""

    def __init__(self, state_dir: Path, admin_kubeconfig: Path, *, namespace: str = NAMESPACE,
                 release: str = RELEASE, chart_dir: Path = CHART_DIR) -> None:
        self.state_dir = Path(state_dir)
        self.admin_kubeconfig = Path(admin_kubeconfig)
        self.namespace = namespace
        self.release = release
        self.chart_dir = chart_dir

    def helm(self, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
        """Run ``helm`` against the cluster (its caches and config in the state dir); raises with helm's
        own words on failure."""
        home = self.state_dir / "helm"
        env = {**os.environ, "KUBECONFIG": str(self.admin_kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
               "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
        result = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, env=env,
                                timeout=timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def install(self, values: dict | None = None, *, upgrade: bool = False) -> None:
        """``helm install`` (or ``upgrade``) with ``values`` on top of ``replicaCount: 0``; waits until ready."""
        values_file = self.state_dir / "helm-values.yaml"
        values_file.parent.mkdir(parents=True, exist_ok=True)
        values_file.write_text(yaml.safe_dump({"replicaCount": 0, **(values or {})}))
        verb = ["upgrade"] if upgrade else ["install"]
        self.helm(*verb, self.release, str(self.chart_dir), "--namespace", self.namespace,
                  "--values", str(values_file), "--wait", "--timeout", "2m")

    def uninstall(self) -> None:
        self.helm("uninstall", self.release, "--namespace", self.namespace, "--wait", "--timeout", "2m")

    def manifest(self) -> list[dict]:
        """The objects of the installed release (``helm get manifest``)."""
        out = self.helm("get", "manifest", self.release, "--namespace", self.namespace).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    @property
    def service_account(self) -> str:
        return next(o["metadata"]["name"] for o in self.manifest() if o["kind"] == "ServiceAccount")

    def operator_kubeconfig(self, url: str, ca: Path) -> Path:
        """A kubeconfig with a token the API issues for the chart's ServiceAccount (TokenRequest), 0600."""
        from kubernetes import client, config

        api = client.CoreV1Api(config.new_client_from_config(config_file=str(self.admin_kubeconfig)))
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[], expiration_seconds=TOKEN_SECONDS))
        issued = api.create_namespaced_service_account_token(self.service_account, self.namespace, request)
        return write_tls_kubeconfig(self.state_dir / "operator.kubeconfig", url, ca=ca, token=issued.status.token)

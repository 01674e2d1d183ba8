"""Kueue (sigs.k8s.io/kueue), the real one, beside the real control plane (:mod:`loco_local.controlplane`).

``make kube`` builds the manager and copies its CRDs into ``<kube cache>/kueue-<version>/``
(``local/kube/kueue/build.sh``). :class:`Kueue` installs the CRDs, starts the manager out of cluster with the
admin kubeconfig and stops it again.

Why Kueue's internal certificate management stays on (its default): with it off, v0.17.0's ``main.go``
always reads the metrics certificate from ``/etc/kueue/metrics/certs``, whatever the metrics settings. With it
on, Kueue issues its own CA and webhook certificate into ``<state>/webhook-certs`` and injects the CA into the
conversion webhooks of its CRDs, as in its release manifests. In a cluster the kubelet mounts that Secret
into the webhook's certificate directory: here :class:`Kueue` copies it there (Kueue waits for the files).
The API server reaches that webhook server on loopback through an ExternalName Service (``localhost``): the
Service name stays the TLS server name the certificate is issued for. Kueue's validating and mutating
webhooks are not registered (yet).

State directory: ``config.yaml``, ``crds.json`` (the CRDs as applied), ``webhook-certs/``, ``logs/kueue.log``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import yaml
from kubernetes import client, config

from loco_local.controlplane import Component, free_port
from loco_local.pki import write_private

VERSION = "v0.17.0"
NAMESPACE = "kueue-system"
WEBHOOK_SERVICE = "kueue-webhook-service"
WEBHOOK_SECRET = "kueue-webhook-server-cert"
#: the CRDs Kueue's release serves through its conversion webhook (config/components/crd/kustomization.yaml)
CONVERTED = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
FIELD_MANAGER = "loco-kueue"


class KueueBinaryMissing(RuntimeError):
    """Kueue has not been built (``make kube``)."""


def kueue_dir() -> Path:
    """Where ``local/kube/kueue/build.sh`` puts the manager and the CRDs; raises :class:`KueueBinaryMissing`."""
    cache = os.environ.get("LOCO_KUBE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loco" / "kube"
    path = Path(cache) / f"kueue-{VERSION}"
    if not os.access(path / "kueue", os.X_OK) or not (path / "crds" / "kueue.x-k8s.io_workloads.yaml").is_file():
        raise KueueBinaryMissing(f"Kueue {VERSION} is not built (kueue or crds/ missing in {path}): run 'make kube' "
                                 "(local/kube/kueue/build.sh builds sigs.k8s.io/kueue/cmd/kueue)")
    return path


def kueue_binary() -> Path:
    """The Kueue manager (``sigs.k8s.io/kueue/cmd/kueue``)."""
    return kueue_dir() / "kueue"


def kueue_crds() -> list[Path]:
    """Kueue's CRD manifests, as its release ships them (without the conversion webhook, which :class:`Kueue` adds)."""
    return sorted((kueue_dir() / "crds").glob("*.yaml"))


class Kueue:
    """The Kueue manager as a child process, against the cluster of ``kubeconfig`` (a cluster admin's).

    Args:
        kubeconfig: e.g. :attr:`loco_local.controlplane.ControlPlane.kubeconfig`.
        state_dir: configuration, certificates and log (see the module docstring).
        binary: the manager (default: :func:`kueue_binary`).
    """

    def __init__(self, kubeconfig: Path, state_dir: Path, *, binary: Path | None = None) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.state_dir = Path(state_dir).resolve()
        self.binary = Path(binary) if binary else kueue_binary()
        self.webhook_port = 0
        self.probe_port = 0
        self.component: Component | None = None
        self.core = client.CoreV1Api(config.new_client_from_config(config_file=str(self.kubeconfig)))

    @property
    def cert_dir(self) -> Path:
        """The webhook server's certificate directory (``tls.crt``, ``tls.key``)."""
        return self.state_dir / "webhook-certs"

    def __enter__(self) -> Kueue:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def kubectl(self, *args: str, timeout_s: float = 120) -> str:
        """Run kubectl as the admin; raise with its stderr when it fails."""
        done = subprocess.run(["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def start(self, timeout_s: float = 180.0) -> None:
        """Install the CRDs and the objects Kueue expects, start the manager, return once it is ready.
        Stops it on failure."""
        deadline = time.monotonic() + timeout_s
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.cert_dir.mkdir(mode=0o700, exist_ok=True)
        self.webhook_port, self.probe_port = free_port(), free_port()
        self._install()
        config = self.state_dir / "config.yaml"
        config.write_text(yaml.safe_dump(self._configuration(), sort_keys=False))
        self.component = Component("kueue", [
            str(self.binary), f"--config={config}", f"--kubeconfig={self.kubeconfig}", "--zap-log-level=info",
        ], self.state_dir / "logs" / "kueue.log")
        self.component.start()
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def _install(self) -> None:
        """The namespace, the (empty) Secret Kueue's certificate rotator fills, the Service that routes the
        API server to the webhook server, and the CRDs with their conversion webhook, all server-side applied."""
        docs: list[dict] = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": WEBHOOK_SECRET, "namespace": NAMESPACE}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": WEBHOOK_SERVICE, "namespace": NAMESPACE},
             "spec": {"type": "ExternalName", "externalName": "localhost"}},
        ]
        crds = []
        for path in kueue_crds():
            crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            if crd["spec"]["names"]["plural"] in CONVERTED:
                crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {"service": {"namespace": NAMESPACE, "name": WEBHOOK_SERVICE, "path": "/convert",
                                                 "port": self.webhook_port}}}}
            crds.append(crd)
        manifest = self.state_dir / "crds.json"
        manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs + crds}))
        self.kubectl("apply", "--server-side", "--force-conflicts", f"--field-manager={FIELD_MANAGER}",
                     "-f", str(manifest))
        self.kubectl("wait", "--for=condition=Established", "--timeout=120s",
                     *(f"crd/{crd['metadata']['name']}" for crd in crds), timeout_s=150)

    def _configuration(self) -> dict:
        """Kueue's Configuration: loopback ports of our choosing, no leader election, no metrics server (Loco's
        tests do not scrape it), the batch/job integration only (Kueue manages no Job without a queue name)."""
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.probe_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(self.cert_dir)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": True, "webhookServiceName": WEBHOOK_SERVICE,
                                       "webhookSecretName": WEBHOOK_SECRET},
            "integrations": {"frameworks": ["batch/job"]},
            # the visibility API server would need its own APIService and port: not used here
            "featureGates": {"VisibilityOnDemand": False},
        }

    def _mount_certs(self) -> None:
        """Copy the webhook certificate from Kueue's Secret into :attr:`cert_dir`, as a Secret volume would."""
        data = self.core.read_namespaced_secret(WEBHOOK_SECRET, NAMESPACE).data or {}
        for name in ("tls.key", "tls.crt"):  # the key first: Kueue goes on once tls.crt exists
            path = self.cert_dir / name
            if name in data and (not path.is_file() or path.read_bytes() != base64.b64decode(data[name])):
                write_private(path, base64.b64decode(data[name]))

    def _wait_ready(self, deadline: float) -> None:
        """Poll ``/readyz``: it answers 200 once the certificates are issued and injected and the webhook
        server listens (before that the bootstrap manager answers 404)."""
        assert self.component is not None
        url, last = f"http://127.0.0.1:{self.probe_port}/readyz", ""
        while time.monotonic() < deadline:
            if not self.component.alive():
                raise RuntimeError(f"kueue exited during start-up; its log ends:\n{self.component.log_tail()}")
            self._mount_certs()
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise TimeoutError(f"kueue not ready at {url} ({last}); its log ends:\n{self.component.log_tail()}")

    def check(self) -> None:
        """Raise if the manager died (with its log's tail)."""
        if self.component is None or not self.component.alive():
            tail = self.component.log_tail() if self.component else ""
            raise RuntimeError(f"kueue is not running; its log ends:\n{tail}")

    def stop(self) -> None:
        """Stop the manager (SIGTERM, then SIGKILL after 10 s). Idempotent; the CRDs and objects stay."""
        if self.component is not None:
            self.component.stop()
        self.component = None

"""The real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, built from the Kubernetes project's Go modules (``local/kube``, ``make kube``).

:class:`ControlPlane` starts the four as processes of one multi-call binary (``loco-kube``), TLS
everywhere, with the credentials of :class:`loco_local.pki.ClusterPKI`, and stops them. It knows nothing
of nodes or Loco: :class:`loco_local.realcluster.RealCluster` adds those.

State directory layout (all owner-only): ``pki/`` (CA, certificates, keys), ``etcd/`` (the data),
``kubeconfig`` (admin), ``kubeconfigs/<identity>.kubeconfig``, ``logs/<component>.log``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loco_local.apiserver.kubeconfig import write_tls_kubeconfig
from loco_local.procs import die_with_parent
from loco_local.pki import ADMIN, CONTROLLER_MANAGER, SCHEDULER, APISERVER_ETCD, ClusterPKI, Identity

log = logging.getLogger(__name__)

#: the Go module of the control plane, in a checkout or an editable install
KUBE_MODULE = Path(__file__).resolve().parents[1] / "kube"
KUBE_BIN_ENV = "LOCO_KUBE_BIN_DIR"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class KubeBinaryMissing(RuntimeError):
    """The control-plane binary has not been built (``make kube``)."""


def kube_bin_dir() -> Path:
    """The directory where ``local/kube/build.sh`` puts ``loco-kube`` and ``helm`` for the current
    sources (``$LOCO_KUBE_BIN_DIR`` wins); raises :class:`KubeBinaryMissing` saying how to build them."""
    if os.environ.get(KUBE_BIN_ENV):
        path = Path(os.environ[KUBE_BIN_ENV])
    else:
        names = ("go.mod", "go.sum", "main.go", "helm/go.mod", "helm/go.sum", "helm/main.go", "build.sh")
        key = hashlib.sha256(b"".join((KUBE_MODULE / name).read_bytes() for name in names)).hexdigest()[:16]
        cache = os.environ.get("LOCO_KUBE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loco" / "kube"
        path = Path(cache) / key
    missing = [name for name in ("loco-kube", "helm") if not os.access(path / name, os.X_OK)]
    if missing:
        raise KubeBinaryMissing(f"the Kubernetes control plane is not built ({', '.join(missing)} missing in {path}): "
                                "run 'make kube' (builds kube-apiserver, kube-controller-manager, kube-scheduler, "
                                "etcd and helm from Go modules)")
    return path


def kube_binary() -> Path:
    """``loco-kube``: etcd and the three Kubernetes components in one binary."""
    return kube_bin_dir() / "loco-kube"


def helm_binary() -> Path:
    """``helm``, built from helm.sh/helm/v4."""
    return kube_bin_dir() / "helm"


def free_port() -> int:
    """A TCP port free on loopback right now, below the kernel's ephemeral range: a port the kernel hands out (bind to
    port 0) can be taken by any outgoing connection between this check and the component's own bind, which then
    fails to start; outgoing connections never take one below the range. Below 29000 too: the trainers' rendezvous
    ports start at 29500 (MASTER_PORT, and one more per live-resize epoch)."""
    high = min(_ephemeral_low(), 29000)
    for _ in range(200):
        port = random.randrange(20000, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free below the range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768, its default, where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(20001, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class Component:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback (see the module docstring).

    Args:
        state_dir: where certificates, etcd data, kubeconfigs and logs go (created 0700).
        binary: ``loco-kube`` (default: :func:`kube_binary`).
        node_monitor_grace_s: how long a node may miss heartbeats before the node lifecycle controller
            marks it unreachable (Kubernetes' default is 50 s; tests want it shorter).
        verbosity: the components' ``-v``.
        apiserver_args: more kube-apiserver flags (the differential test's short etcd compaction interval).
    """

    def __init__(self, state_dir: Path, *, binary: Path | None = None, node_monitor_grace_s: int = 20,
                 verbosity: int = 1, apiserver_args: Sequence[str] = ()) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.apiserver_args = list(apiserver_args)
        self.binary = Path(binary) if binary else kube_binary()
        self.pki = ClusterPKI(self.state_dir / "pki")
        self.node_monitor_grace_s = node_monitor_grace_s
        self.verbosity = verbosity
        self.port = 0
        self.components: list[Component] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (``KUBECONFIG`` for the user, kubectl and the tests)."""
        return self.state_dir / "kubeconfig"

    def kubeconfig_for(self, identity: Identity) -> Path:
        """A kubeconfig authenticating as ``identity`` (its client certificate is issued if missing)."""
        cert, key = self.pki.client(identity)
        path = self.state_dir / "kubeconfigs" / f"{identity.stem}.kubeconfig"
        write_tls_kubeconfig(path, self.url, ca=self.pki.ca_cert, cert=cert, key=key)
        return path

    # ------------------------------------------------------------------------------ lifecycle

    def start(self, nodes: list[str] = (), timeout_s: float = 120.0) -> None:  # type: ignore[assignment]
        """Start the four components; returns once the API server is ready. Stops all on failure."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.pki.ensure(list(nodes))
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pki, bin_ = self.pki, str(self.binary)
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"https://127.0.0.1:{etcd_port}"
        (self.state_dir / "etcd").mkdir(mode=0o700, exist_ok=True)
        etcd = self._component("etcd", [
            bin_, "etcd", "--name", "loco", "--data-dir", str(self.state_dir / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"https://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"https://127.0.0.1:{peer_port}",
            "--initial-cluster", f"loco=https://127.0.0.1:{peer_port}",
            "--cert-file", str(pki.path("etcd-server", "crt")), "--key-file", str(pki.path("etcd-server", "key")),
            "--trusted-ca-file", str(pki.ca_cert), "--client-cert-auth",
            "--peer-cert-file", str(pki.path("etcd-server", "crt")), "--peer-key-file", str(pki.path("etcd-server", "key")),
            "--peer-trusted-ca-file", str(pki.ca_cert), "--peer-client-cert-auth",
            "--listen-metrics-urls", "", "--log-level", "warn",
        ])
        etcd.start()
        self._wait_https(etcd, f"{etcd_url}/health", APISERVER_ETCD, deadline)

        self.port = free_port()
        etcd_cert, etcd_key = pki.client(APISERVER_ETCD)
        apiserver = self._component("kube-apiserver", [
            bin_, "kube-apiserver", f"--v={self.verbosity}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}", "--advertise-address=127.0.0.1",
            # the apiserver's own Endpoints would hold 127.0.0.1, which the API refuses: nothing runs in-cluster
            # that needs the kubernetes Service routed
            "--endpoint-reconciler-type=none",
            f"--etcd-servers={etcd_url}", f"--etcd-cafile={pki.ca_cert}",
            f"--etcd-certfile={etcd_cert}", f"--etcd-keyfile={etcd_key}",
            f"--tls-cert-file={pki.path('apiserver', 'crt')}", f"--tls-private-key-file={pki.path('apiserver', 'key')}",
            f"--client-ca-file={pki.ca_cert}", "--anonymous-auth=false",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}", f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false", *self.apiserver_args,
        ])
        apiserver.start()
        write_tls_kubeconfig(self.kubeconfig, self.url, ca=pki.ca_cert, cert=pki.path(ADMIN.stem, "crt"),
                             key=pki.path(ADMIN.stem, "key"))
        self._wait_https(apiserver, f"{self.url}/readyz", ADMIN, deadline)

        cm = self.kubeconfig_for(CONTROLLER_MANAGER)
        self._component("kube-controller-manager", [
            bin_, "kube-controller-manager", f"--v={self.verbosity}",
            f"--kubeconfig={cm}", f"--authentication-kubeconfig={cm}", f"--authorization-kubeconfig={cm}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_cert}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # pod IPs are loopback addresses, which the API refuses in Endpoints and EndpointSlices: those
            # controllers could only fail (cluster DNS is served from the pods instead, loco_local.realcluster)
            "--controllers=*,-endpoint,-endpointslice,-endpointslicemirroring",
            # a lost node is noticed in node_monitor_grace_s (checked every 2 s), as the issue's tests need
            "--node-monitor-period=2s", f"--node-monitor-grace-period={self.node_monitor_grace_s}s",
        ]).start()
        sched = self.kubeconfig_for(SCHEDULER)
        self._component("kube-scheduler", [
            bin_, "kube-scheduler", f"--v={self.verbosity}",
            f"--kubeconfig={sched}", f"--authentication-kubeconfig={sched}", f"--authorization-kubeconfig={sched}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false",
        ]).start()

    def _component(self, name: str, argv: list[str]) -> Component:
        component = Component(name, argv, self.state_dir / "logs" / f"{name}.log")
        self.components.append(component)
        return component

    def _wait_https(self, component: Component, url: str, identity: Identity, deadline: float) -> None:
        """Poll ``url`` with ``identity``'s certificate until it answers 200; fail with the log's tail."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(*map(str, self.pki.client(identity)))
        last = ""
        while time.monotonic() < deadline:
            if not component.alive():
                raise RuntimeError(f"{component.name} exited during start-up; its log ends:\n{component.log_tail()}")
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.3)
        raise TimeoutError(f"{component.name} not ready at {url} ({last}); its log ends:\n{component.log_tail()}")

    def check(self) -> None:
        """Raise if a component died (with its log's tail)."""
        for component in self.components:
            if not component.alive():
                raise RuntimeError(f"{component.name} is not running; its log ends:\n{component.log_tail()}")

    def stop(self) -> None:
        """Stop every component, newest first (the API server before etcd). Idempotent."""
        for component in reversed(self.components):
            component.stop()
        self.components = []

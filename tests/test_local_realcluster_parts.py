"""The parts of the real-control-plane cluster that need no control plane: credentials, the volume
provisioner's and DNS's decisions, the node registration, and child processes dying with their parent."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loco_local.apiclient import Informer
from loco_local.apiserver.kubeconfig import write_tls_kubeconfig
from loco_local.controlplane import KubeBinaryMissing, kube_binary
from loco_local.nodeagent import registration
from loco_local.nodes import READY_ANNOTATION, NodeSpec
from loco_local.pki import ADMIN, ClusterPKI, node_identity
from loco_local.realcluster import ClusterDNS, persistent_volume, wants_volume


def _subject(path: Path) -> tuple[str, list[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return str(cn), [str(o) for o in orgs]


def test_pki_keys_are_owner_only_and_subjects_are_what_the_authorizers_expect(tmp_path: Path) -> None:
    pki = ClusterPKI(tmp_path / "pki")
    pki.ensure(["node-0", "node-1"])
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    keys = sorted((tmp_path / "pki").glob("*.key"))
    assert len(keys) >= 9
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert _subject(pki.path("node-node-1", "crt")) == ("system:node:node-1", ["system:nodes"])
    assert _subject(pki.path(ADMIN.stem, "crt")) == ("loco-admin", ["system:masters"])
    node_cert = x509.load_pem_x509_certificate(pki.path("node-node-0", "crt").read_bytes())
    usages = node_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a node's certificate cannot serve TLS
    serving = x509.load_pem_x509_certificate(pki.path("apiserver", "crt").read_bytes())
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kubernetes.default.svc" in names.get_values_for_type(x509.DNSName)
    # issued by the cluster CA
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    serving.verify_directly_issued_by(ca)


def test_pki_keeps_existing_credentials_and_issues_only_what_is_missing(tmp_path: Path) -> None:
    pki = ClusterPKI(tmp_path / "pki")
    pki.ensure(["node-0"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()}
    pki.ensure(["node-0", "node-7"])
    after = {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()}
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"node-node-7.crt", "node-node-7.key"}
    assert _subject(pki.path(node_identity("node-7").stem, "crt"))[0] == "system:node:node-7"


def test_tls_kubeconfig_is_owner_only_and_names_its_credential(tmp_path: Path) -> None:
    path = write_tls_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", ca=tmp_path / "ca.crt", token="secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = yaml.safe_load(path.read_text())
    assert doc["users"][0]["user"] == {"token": "secret"}
    assert doc["clusters"][0]["cluster"]["certificate-authority"] == str(tmp_path / "ca.crt")


def test_missing_control_plane_binary_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOCO_KUBE_BIN_DIR", str(tmp_path / "nope"))
    with pytest.raises(KubeBinaryMissing, match="make kube"):
        kube_binary()


def _claim(**spec: object) -> dict:
    return {"metadata": {"name": "ckpt", "namespace": "team", "uid": "u-1",
                         "annotations": {"volume.kubernetes.io/storage-provisioner": "loco.dev/local-path"}},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "5Gi"}}, **spec}}


def test_provisioner_makes_a_prebound_host_path_volume_for_its_own_unbound_claims(tmp_path: Path) -> None:
    claim = _claim()
    assert wants_volume(claim)
    assert not wants_volume(_claim(volumeName="pvc-u-1"))  # bound already
    other = _claim()
    other["metadata"]["annotations"]["volume.kubernetes.io/storage-provisioner"] = "ebs.csi.aws.com"
    assert not wants_volume(other)
    pv = persistent_volume(claim, tmp_path / "team" / "ckpt")
    assert pv["metadata"]["name"] == "pvc-u-1"
    assert pv["spec"]["claimRef"] == {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "team",
                                      "name": "ckpt", "uid": "u-1"}
    assert pv["spec"]["capacity"] == {"storage": "5Gi"}
    assert pv["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pv["spec"]["hostPath"]["path"] == str(tmp_path / "team" / "ckpt")


def test_dns_answers_only_for_pods_behind_a_headless_service(tmp_path: Path) -> None:
    def pod(name: str, ns: str, sub: str, ip: str) -> dict:
        return {"metadata": {"name": name, "namespace": ns}, "spec": {"hostname": name, "subdomain": sub},
                "status": {"podIP": ip, "phase": "Running"}}

    pods = Informer.__new__(Informer)
    pods.cache = {"a": pod("j-worker-0", "default", "j", "127.9.1.1"),
                  "b": pod("k-worker-0", "default", "k", "127.9.1.2"),  # service k is not headless
                  "c": pod("x-0", "default", "nosvc", "127.9.1.3")}
    services = Informer.__new__(Informer)
    services.cache = {"j": {"metadata": {"name": "j", "namespace": "default"}, "spec": {"clusterIP": "None"}},
                      "k": {"metadata": {"name": "k", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.7"}}}
    lines = ClusterDNS(pods, services, tmp_path / "hosts").lines()
    assert lines == ["127.9.1.1\tj-worker-0.j.default.svc.cluster.local j-worker-0.j.default.svc j-worker-0.j"]


def test_node_registration_carries_no_simulation_annotation() -> None:
    node = registration(NodeSpec("node-3", cpu="4", memory="16Gi"), "127.9.0.4")
    assert READY_ANNOTATION not in node["metadata"]["annotations"]
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == "node-3"
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "127.9.0.4"}


def test_a_child_started_with_die_with_parent_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        from loco_local.procs import die_with_parent
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                 start_new_session=True, preexec_fn=die_with_parent)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the parent never started its child"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(child, 0)  # alive
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while True:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            # a zombie is reaped by init; /proc says so before it disappears
            status = Path(f"/proc/{child}/status")
            if status.exists() and "State:\tZ" in status.read_text():
                break
            assert time.monotonic() < deadline, "the child outlived its killed parent"
            time.sleep(0.05)
    finally:
        parent.kill()


def test_component_ports_come_from_below_the_ephemeral_range_and_the_trainers_ports() -> None:
    """An ephemeral port picked for a component could be taken by an outgoing connection before the component binds
    it; rendezvous ports start at 29500."""
    import socket

    from loco_local.controlplane import free_port

    ports = {free_port() for _ in range(20)}
    assert all(20000 <= port < 29000 for port in ports), ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free when handed out

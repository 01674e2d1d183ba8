"""Kubeconfigs for the local clusters, read by kubectl, the ``kubernetes`` Python client and kopf.

They are credentials: written owner-only (0600), into directories only the owner may enter."""

from __future__ import annotations

from pathlib import Path

import yaml

CONTEXT = "loco-local"


def kubeconfig_dict(url: str, namespace: str = "default") -> dict:
    """The kubeconfig document: one cluster, user and context, all named ``loco-local``."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{"name": CONTEXT, "cluster": {"server": url}}],
        "users": [{"name": CONTEXT, "user": {}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": CONTEXT, "namespace": namespace}}],
        "current-context": CONTEXT,
    }


def write_kubeconfig(path: Path | str, url: str, *, token: str, ca: Path | None = None,
                     namespace: str = "default") -> Path:
    """The kubeconfig of the embedded API server at ``url`` (e.g. ``http://127.0.0.1:8001``), with its
    bearer ``token`` (and the CA of its HTTPS certificate, when it serves HTTPS)."""
    return write_tls_kubeconfig(path, url, ca=ca, token=token, namespace=namespace)


def write_tls_kubeconfig(
    path: Path | str, url: str, *, ca: Path | None, cert: Path | None = None, key: Path | None = None,
    token: str | None = None, namespace: str = "default",
) -> Path:
    """A kubeconfig authenticating with a client certificate or a bearer token, trusting ``ca`` for
    the server's certificate (the real control plane; the embedded one with ``--allow-remote``)."""
    from loco_local.pki import write_private

    credential: dict[str, str] = {}
    if cert is not None and key is not None:
        credential = {"client-certificate": str(cert), "client-key": str(key)}
    if token is not None:
        credential["token"] = token
    doc = kubeconfig_dict(url, namespace)
    if ca is not None:
        doc["clusters"][0]["cluster"]["certificate-authority"] = str(ca)
    doc["users"][0] = {"name": CONTEXT, "user": credential}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, yaml.safe_dump(doc, sort_keys=False).encode())
    return path

"""A kubeconfig for the embedded API server (plain HTTP, no auth), read by kubectl, the
``kubernetes`` Python client and kopf."""

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


def write_kubeconfig(path: Path | str, url: str, namespace: str = "default") -> Path:
    """Write the kubeconfig for ``url`` (e.g. ``http://127.0.0.1:8001``) to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(kubeconfig_dict(url, namespace), sort_keys=False))
    return path


def write_tls_kubeconfig(
    path: Path | str, url: str, *, ca: Path, cert: Path | None = None, key: Path | None = None,
    token: str | None = None, namespace: str = "default",
) -> Path:
    """A kubeconfig for a TLS API server (the real control plane), authenticating with a client
    certificate or a bearer token; written owner-only (it is a credential)."""
    from loco_local.pki import write_private

    credential: dict[str, str] = {}
    if cert is not None and key is not None:
        credential = {"client-certificate": str(cert), "client-key": str(key)}
    if token is not None:
        credential["token"] = token
    doc = kubeconfig_dict(url, namespace)
    doc["clusters"][0]["cluster"]["certificate-authority"] = str(ca)
    doc["users"][0] = {"name": CONTEXT, "user": credential}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, yaml.safe_dump(doc, sort_keys=False).encode())
    return path

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

"""Who may call the embedded API server, and what it reads: as kube-apiserver does.

- Every request but the health probes carries the cluster's bearer token (``Authorization: Bearer``);
  without it the answer is 401 before anything is looked at. The token is made per cluster and lives
  only in the owner-only kubeconfig.
- A body is read only when it says it is one of Kubernetes' media types, so a browser's "simple"
  cross-origin POST (``text/plain``, no preflight) can never be a write: 415.
- A body is at most :data:`MAX_BODY_BYTES` (kube-apiserver's limit, 413), and a YAML body may not
  expand its aliases past :data:`MAX_YAML_NODES` nodes (the "billion laughs"), 400 as kube-apiserver.
- No CORS headers are ever sent, so a page on another origin cannot read an answer either.
"""

from __future__ import annotations

import hmac
import secrets
import sys
from typing import Any

import yaml

from .errors import APIError

#: probes answered without a credential (kube-apiserver grants them to everyone via system:public-info-viewer)
PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
#: what a create, update or DeleteOptions body may be (kube-apiserver's serializers)
BODY_TYPES = ("application/json", "application/yaml", "application/vnd.kubernetes.protobuf")
#: kube-apiserver's ``MaxRequestBodyBytes``
MAX_BODY_BYTES = 3 * 1024 * 1024
#: how many nodes a YAML body may hold once its aliases are expanded (the same order as the JSON a 3 MiB body holds)
MAX_YAML_NODES = 1_000_000
#: how deep a body may nest: kube-apiserver reads 10,000 levels; this Python server copies and validates objects
#: recursively, so it stops before its interpreter would (about 1,200 at the default recursion limit), yet past
#: 1,000 so that the fuzzers' 1,000-deep free-form values reach the operator as on a real cluster
#: (a difference listed in docs/local-cluster.md)
MAX_DEPTH = 1_100
#: the recursion limit a body of MAX_DEPTH levels needs on its way through the decoder, copies and validation
#: (a few frames a level); at Python's default (1,000) the JSON decoder alone gives up before 1,000 levels
DEPTH_RECURSION_LIMIT = 30 * MAX_DEPTH


def new_token() -> str:
    """A fresh bearer token: 256 random bits."""
    return secrets.token_urlsafe(32)


def unauthorized() -> APIError:
    return APIError(401, "Unauthorized", "Unauthorized")


def authenticate(path: str, authorization: str | None, token: str) -> None:
    """401 unless ``authorization`` is ``Bearer <token>`` (or the path is a public probe)."""
    if path in PUBLIC_PATHS:
        return
    scheme, _, presented = (authorization or "").strip().partition(" ")
    # compare_digest: the answer's timing must not tell how much of a guess was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise unauthorized()


def check_body_type(content_type: str) -> None:
    """415 for a create, update or delete body in anything but Kubernetes' media types."""
    if content_type not in BODY_TYPES:
        raise APIError(415, "UnsupportedMediaType",
                       f"the body of the request was in an unknown format - accepted media types include: "
                       f"{', '.join(BODY_TYPES)}")


def too_large() -> APIError:
    return APIError(413, "RequestEntityTooLarge",
                    f"the request body is larger than the server's limit of {MAX_BODY_BYTES} bytes")


def load_yaml(raw: bytes) -> Any:
    """``yaml.safe_load`` that refuses a document whose aliases expand past :data:`MAX_YAML_NODES` nodes.

    PyYAML shares an aliased node instead of copying it, so parsing a bomb is cheap; it is everything after
    (JSON encoding, validation, storage) that would expand it. The walk below counts the nodes as they
    would be expanded and stops at the limit, so it is cheap too.
    """
    doc = yaml.safe_load(raw)
    budget = [MAX_YAML_NODES]

    def walk(node: Any) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise APIError(400, "BadRequest", "yaml: document contains excessive aliasing (more than "
                                              f"{MAX_YAML_NODES} nodes once expanded)")
        if isinstance(node, dict):
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return doc


def allow_max_depth() -> None:
    """Raise this process's recursion limit so that a body of MAX_DEPTH levels is served whatever the process
    set before (never lowered: the operator, when it shares the process, wants as much)."""
    if sys.getrecursionlimit() < DEPTH_RECURSION_LIMIT:
        sys.setrecursionlimit(DEPTH_RECURSION_LIMIT)


def check_depth(doc: Any) -> None:
    """400 for a body nested deeper than :data:`MAX_DEPTH` (walked without recursion)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, "BadRequest", f"the request body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)

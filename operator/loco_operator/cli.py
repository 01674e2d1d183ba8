"""``loco operator run`` and ``loco crds``.

``loco operator run`` embeds Kopf (``kopf.operator``) with the handlers of
:mod:`loco_operator.handlers`: standalone by default (one operator per cluster, no peering),
watching one namespace, several, or all; Prometheus metrics on ``--metrics-port``; an optional
liveness endpoint. ``loco crds`` prints the generated CRDs; ``--write`` writes crds/trainingjob.yaml and crds/population.yaml.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import click

from .apidoc import API_DOC_PATH, write_api_doc
from .crd import CRD_PATH, render_crd_yaml, write_crd, write_if_changed
from .planner import NODE_LOST_GRACE_S


#: Python recursion limit of the operator process. kube-apiserver takes JSON nested up to 10,000 levels
#: in a custom resource's free-form fields (spec.model.kwargs); Kopf's watch decoder and the Kubernetes
#: client recurse once or twice per level. At Python's default (1,000) one such object ended the watch
#: with a RecursionError and the operator crash-looped; the planner then refuses the job (InvalidSpec).
#: The operator's threads have the platform's default 8 MiB stack, enough for 10,000 levels.
RECURSION_LIMIT = 30_000


def allow_deep_objects(limit: int = RECURSION_LIMIT) -> None:
    """Raise this process's recursion limit to ``limit`` (never lower it)."""
    if sys.getrecursionlimit() < limit:
        sys.setrecursionlimit(limit)


def load_api_client(kubeconfig: str | None, context: str | None = None) -> Any:
    """An ApiClient for the cluster: ``--kubeconfig``/$KUBECONFIG/~/.kube/config, else in-cluster."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (config.ConfigException, FileNotFoundError, TypeError) as exc:
        if kubeconfig:
            raise click.ClickException(f"cannot load --kubeconfig {kubeconfig}: {exc}") from exc
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as exc2:
            raise click.ClickException(
                "no cluster credentials: pass --kubeconfig, set KUBECONFIG, or run inside a pod "
                f"({exc}; {exc2})"
            ) from exc2
    return client.ApiClient(configuration)


async def run_operator(
    api_client: Any,
    *,
    namespaces: tuple[str, ...] = (),
    all_namespaces: bool = False,
    metrics_port: int | None = 9090,
    liveness: str | None = None,
    standalone: bool = True,
    peering_name: str | None = None,
    priority: int = 0,
    node_lost_grace_s: float | None = None,
    cordon_nodes: bool = False,
    network_policy_peers: list[dict[str, Any]] | None = None,
    status_port: int | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run the operator until ``stop_flag`` is set (or forever). Embeddable: tests call it directly.

    ``metrics_port`` None disables metrics; 0 picks a free port (logged). ``status_port`` overrides
    the workers' progress port (tests serve fake workers on a free port). ``cordon_nodes``: jobs asking
    for it (``faultDetection.cordonNodes``) may have a blamed node cordoned. ``network_policy_peers``: make a
    NetworkPolicy per job that lets its own pods and these peers reach its workers (None: none).
    """
    import kopf

    from .handlers import OperatorContext, registry
    from .population import handlers as _population  # noqa: F401 - registers the Population's handlers on registry

    allow_deep_objects()
    ctx = OperatorContext(api_client=api_client, cordon_nodes=cordon_nodes, network_policy_peers=network_policy_peers)
    if node_lost_grace_s is not None:
        ctx.node_lost_grace_s = node_lost_grace_s
    if status_port is not None:
        ctx.status_port = status_port
    if metrics_port is not None:
        port = ctx.metrics.serve(metrics_port)
        logging.getLogger(__name__).info(f"operator metrics on :{port}/metrics")
    try:
        await kopf.operator(
            registry=registry,
            memo=kopf.Memo(loco=ctx),
            clusterwide=all_namespaces,
            namespaces=() if all_namespaces else (namespaces or ("default",)),
            standalone=standalone,
            peering_name=peering_name,
            priority=priority,
            liveness_endpoint=liveness,
            ready_flag=ready_flag,
            stop_flag=stop_flag,
        )
    finally:
        ctx.metrics.close()


@click.group("operator")
def operator() -> None:
    """The TrainingJob operator."""


@operator.command("run")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), envvar="KUBECONFIG", help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster).")
@click.option("--context", default=None, help="Kubeconfig context (default: the current one).")
@click.option("--namespace", "-n", "namespaces", multiple=True, help="Namespace to watch (repeatable; default: 'default').")
@click.option("--all-namespaces", "-A", is_flag=True, help="Watch every namespace (cluster-wide).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9090, show_default=True, help="Port of /metrics (0: any free port).")
@click.option("--liveness", default="", help="Liveness endpoint URL, e.g. http://0.0.0.0:8081/healthz (default: none).")
@click.option("--peering", "peering_name", default=None, help="Use Kopf peering with this name instead of --standalone.")
@click.option("--priority", type=click.IntRange(0, None), default=None, envvar="LOCO_OPERATOR_PRIORITY",
              help="Peering priority: the highest-priority operator acts, the others stand by "
                   "(default with --peering: derived from $POD_NAME or the host name, so replicas differ).")
@click.option("--node-lost-grace-seconds", "node_lost_grace_s", type=click.FloatRange(0, None), default=NODE_LOST_GRACE_S,
              show_default=True, envvar="LOCO_NODE_LOST_GRACE_SECONDS",
              help="How long a worker's node may be not Ready before the worker counts as lost: the job restarts "
                   "(or shrinks) without it, and a pod stuck Terminating there is force-deleted.")
@click.option("--cordon-nodes/--no-cordon-nodes", default=False, show_default=True, envvar="LOCO_CORDON_NODES",
              help="Let a TrainingJob whose faultDetection.cordonNodes is true have the node its fault blamed cordoned "
                   "(unschedulable, a loco.dev/fault taint). A cordon affects every tenant, so it is the cluster "
                   "operator's choice; needs RBAC to patch nodes. Off: such a request gets a CordonNotEnabled Warning "
                   "event and the node is only on the job's own avoid-list.")
@click.option("--network-policy", "network_policy", default=None, envvar="LOCO_NETWORK_POLICY", metavar="PEERS",
              help="Give every job a NetworkPolicy: its workers' ports answer its own pods and these peers only, a JSON "
                   "list of NetworkPolicyPeer objects (the operator's pods: it polls /status and posts /membership; a "
                   "Prometheus). The chart sets it. Default: no NetworkPolicy (an operator outside the cluster could "
                   "not reach the workers through one).")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def run(
    kubeconfig: str | None, context: str | None, namespaces: tuple[str, ...], all_namespaces: bool,
    metrics_port: int, liveness: str, peering_name: str | None, priority: int | None, node_lost_grace_s: float,
    cordon_nodes: bool, network_policy: str | None, verbose: bool,
) -> None:
    """Run the operator until interrupted."""
    if all_namespaces and namespaces:
        raise click.UsageError("use either --namespace or --all-namespaces, not both")
    peers = parse_network_policy_peers(network_policy)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("kubernetes").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        logging.getLogger("kopf.objects").addFilter(_quiet_routine_success)
    api_client = load_api_client(kubeconfig, context)
    # A liveness URL with port 0 is not supported by Kopf; '' disables the endpoint.
    asyncio.run(
        run_operator(
            api_client,
            namespaces=namespaces,
            all_namespaces=all_namespaces,
            metrics_port=metrics_port,
            liveness=liveness or None,
            standalone=peering_name is None,
            peering_name=peering_name,
            priority=peering_priority(priority),
            node_lost_grace_s=node_lost_grace_s,
            cordon_nodes=cordon_nodes,
            network_policy_peers=peers,
        )
    )


NETWORK_POLICY_PEER_KEYS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})


def parse_network_policy_peers(text: str | None) -> list[dict[str, Any]] | None:
    """``--network-policy``: a JSON list of NetworkPolicyPeer objects (None when not given)."""
    if text is None or not text.strip():
        return None
    try:
        peers = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--network-policy") from None
    if not isinstance(peers, list):
        raise click.BadParameter("must be a JSON list of NetworkPolicyPeer objects", param_hint="--network-policy")
    for i, peer in enumerate(peers):
        if not isinstance(peer, dict) or not peer or set(peer) - NETWORK_POLICY_PEER_KEYS:
            raise click.BadParameter(f"[{i}] must be an object with podSelector, namespaceSelector or ipBlock, "
                                     f"got {json.dumps(peer)}", param_hint="--network-policy")
    return peers


def peering_priority(explicit: int | None, environ: dict[str, str] | None = None) -> int:
    """The operator's Kopf peering priority. Kopf pauses every operator that sees a peer of equal or
    higher priority, so replicas must not share one: unless given, derive a stable value in
    1..1,000,000 from the pod's name (the chart sets POD_NAME) or, outside Kubernetes, the host name."""
    if explicit is not None:
        return explicit
    env = os.environ if environ is None else environ
    identity = env.get("POD_NAME") or socket.gethostname()
    return zlib.crc32(identity.encode()) % 1_000_000 + 1


def _quiet_routine_success(record: logging.LogRecord) -> bool:
    """Drop Kopf's "Timer 'on_timer' succeeded." lines (one per job every 2 s) unless --verbose."""
    message = record.getMessage()
    return not (message.endswith("succeeded.") and ("'on_timer'" in message or "'on_pod_event'" in message))


@click.command("crds")
@click.option("--write", is_flag=True, help=f"Write {CRD_PATH} instead of printing.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None, help=f"File for --write (default: {CRD_PATH} in the repository).")
@click.option("--docs", "docs_path", is_flag=False, flag_value=str(API_DOC_PATH), default=None,
              help=f"Also write the API reference (default path: {API_DOC_PATH} in the repository).")
@click.option("--refresh-core-types", is_flag=True,
              help="First rewrite operator/loco_operator/schemas/core-v1.json from the Kubernetes module local/kube pins "
                   "(needs Go; run after bumping Kubernetes).")
def crds(write: bool, output: Path | None, docs_path: str | None, refresh_core_types: bool) -> None:
    """Print (or write) the CRDs generated from the API models: TrainingJob and Population (-o: the TrainingJob
    CRD only, to that file)."""
    from .population import crd as population_crd

    if refresh_core_types:
        from . import kubetypes

        module_dir, version = kubetypes.pinned_module(_repo_root() / "local" / "kube")
        changed = kubetypes.refresh(module_dir, version)
        click.echo(f"{'wrote' if changed else 'unchanged'} {kubetypes.VENDORED} (k8s.io/kubernetes@{version})")
    if docs_path is not None:
        doc = Path(docs_path) if Path(docs_path).is_absolute() else _repo_root() / docs_path
        click.echo(f"{'wrote' if write_api_doc(doc) else 'unchanged'} {doc}")
    if not write:
        if docs_path is None:
            click.echo(render_crd_yaml() + "---\n" + population_crd.render_crd_yaml(), nl=False)
        return
    path = output or _repo_root() / CRD_PATH
    changed = write_crd(path)
    click.echo(f"{'wrote' if changed else 'unchanged'} {path}")
    if output is None:
        path = _repo_root() / population_crd.CRD_PATH
        changed = write_if_changed(path, population_crd.render_crd_yaml())
        click.echo(f"{'wrote' if changed else 'unchanged'} {path}")


def _repo_root() -> Path:
    """The repository root (the directory holding pyproject.toml), else the current directory."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "crds").is_dir():
            return parent
    return Path.cwd()

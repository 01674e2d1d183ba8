"""``loco local``: run and drive the embedded local cluster.

::

    loco local up [--nodes 3] [--gpus-per-node 0] [--cpu 8] [--memory 32Gi] [--nodes-file F]
                  [--port 0] [--state-dir ./.loco/local] [--detach] [--control-plane embedded|kubernetes]
                  [--prometheus [--prometheus-port 9091] [--operator-metrics 127.0.0.1:9090]]
    loco local status
    loco local node not-ready node-1      # simulate a node failure (ready / cordon / uncordon too)
    loco local down

``up`` runs in the foreground until Ctrl-C (or with ``--detach`` as a background daemon: pid file
``cluster.pid``, log ``cluster.log``). While it runs, ``<state-dir>/cluster.json`` records the
API URL and the daemon's pid; ``status``, ``node`` and ``down`` find the cluster through it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import psutil

from loco_local import procs
from loco_local.nodes import NodeSpec, cordon_patch, load_nodes_file, ready_patch, uniform_nodes

DEFAULT_STATE_DIR = Path(".loco/local")
INFO_FILE = "cluster.json"
PID_FILE = "cluster.pid"
LOG_FILE = "cluster.log"

_state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE_DIR, show_default=True,
    envvar="LOCO_LOCAL_STATE_DIR", help="Cluster state: kubeconfig, pod roots and logs, volumes.")


@click.group("local")
def local() -> None:
    """Run the embedded local cluster (API server, scheduler, kubelet running pods as processes)."""


# ------------------------------------------------------------------------------------- helpers


def _running_info(state_dir: Path) -> dict[str, Any] | None:
    """``cluster.json`` of a live cluster in ``state_dir`` (None when none runs)."""
    try:
        info = json.loads((state_dir / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if procs.read_pid_file(state_dir / PID_FILE) is not None else None


def _require_running(state_dir: Path) -> dict[str, Any]:
    info = _running_info(state_dir)
    if info is None:
        raise click.ClickException(
            f"no local cluster is running with state dir {state_dir}; start one with 'loco local up --state-dir {state_dir}'")
    return info


def _http(url: str, method: str = "GET", body: Any = None, kubeconfig: str | Path | None = None) -> Any:
    """One JSON request to the cluster's API with the kubeconfig's credential (bearer token or client
    certificate) and, over HTTPS, its CA."""
    import ssl

    import yaml

    doc = yaml.safe_load(Path(kubeconfig or "").read_text())
    user, cluster = doc["users"][0]["user"], doc["clusters"][0]["cluster"]
    headers = {"Accept": "application/json", "Content-Type": "application/merge-patch+json"}
    if user.get("token"):
        headers["Authorization"] = f"Bearer {user['token']}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        if user.get("client-certificate"):
            context.load_cert_chain(user["client-certificate"], user["client-key"])
    with urllib.request.urlopen(req, timeout=30, context=context) as resp:
        return json.loads(resp.read() or b"{}")


def _node_specs(nodes: int, gpus_per_node: int, cpu: str, memory: str, nodes_file: Path | None) -> list[NodeSpec]:
    try:
        if nodes_file is not None:
            return load_nodes_file(nodes_file)
        return uniform_nodes(nodes, cpu=cpu, memory=memory, gpus=gpus_per_node)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _print_how_to(kubeconfig: Path, url: str, info: dict[str, Any] | None = None) -> None:
    click.echo(f"local cluster up at {url}")
    click.echo(f"kubeconfig: {kubeconfig}")
    click.echo("point kubectl and the operator at it with:")
    click.echo(f"  export KUBECONFIG={kubeconfig}")
    click.echo("  kubectl get nodes")
    click.echo("  loco operator run   # in another shell, with KUBECONFIG set")
    _print_scrape((info or {}).get("prometheus"), (info or {}).get("operatorMetrics", "127.0.0.1:9090"))


def _print_scrape(prometheus_url: str | None, operator_metrics: str) -> None:
    """Where the metrics are (docs/metrics.md): the operator's port and every worker pod's :8080."""
    click.echo("metrics (docs/metrics.md):")
    click.echo(f"  operator: http://{operator_metrics}/metrics   (loco operator run --metrics-port, default 9090)")
    click.echo("  workers:  http://<podIP>:8080/metrics of each worker pod   (pod IPs: loco local status)")
    if prometheus_url:
        click.echo(f"  prometheus: {prometheus_url}   scraping both every 15s; e.g. "
                   f"curl '{prometheus_url}/api/v1/query?query=loco_trainer_loss'")
        click.echo("  dashboards: import charts/loco-operator/dashboards/*.json into Grafana with this Prometheus as data source")
        click.echo(f"  alerts:     {prometheus_url}/alerts   (charts/loco-operator/alerts/loco.rules.yaml, docs/helm.md)")


# ------------------------------------------------------------------------------------------ up


@local.command("up")
@click.option("--nodes", type=click.IntRange(min=1), default=3, show_default=True, help="Number of identical fake nodes.")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=0, show_default=True,
              help="nvidia.com/gpu capacity of each node (fake: for scheduling only).")
@click.option("--cpu", default="8", show_default=True, help="CPU capacity of each node (a Kubernetes quantity).")
@click.option("--memory", default="32Gi", show_default=True, help="Memory capacity of each node (a Kubernetes quantity).")
@click.option("--nodes-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML list of nodes (name, cpu, memory, gpus, labels, taints, count); overrides --nodes.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="API port (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="API listen address. Off loopback it needs --allow-remote too.")
@click.option("--allow-remote", is_flag=True,
              help="Serve the API on a --host off loopback: over HTTPS (a CA in <state-dir>/pki), with the "
                   "kubeconfig's bearer token. Anyone who can reach it and holds the token can run commands here.")
@click.option("--pod-eviction-timeout", "pod_eviction_timeout_s", type=float, default=10.0, show_default=True,
              help="Seconds after a node fails before its pods are marked NodeLost.")
@_state_dir_option
@click.option("--detach", is_flag=True, help="Run as a background daemon and return once the API answers.")
@click.option("--prometheus", "with_prometheus", is_flag=True,
              help="Also run Debian's prometheus binary on loopback, scraping the operator and every worker pod "
                   "(apt-get install prometheus).")
@click.option("--prometheus-port", type=click.IntRange(0, 65535), default=9091, show_default=True,
              help="Prometheus web/API port with --prometheus (0: any free port).")
@click.option("--operator-metrics", default="127.0.0.1:9090", show_default=True, metavar="HOST:PORT",
              help="Where the operator serves /metrics (loco operator run --metrics-port).")
@click.option("--control-plane", type=click.Choice(["embedded", "kubernetes"]), default="embedded", show_default=True,
              help="embedded: Loco's own API server (quick, no build). kubernetes: the real etcd, kube-apiserver, "
                   "kube-controller-manager and kube-scheduler ('make kube' builds them), TLS and RBAC, with one "
                   "node agent process per node.")
def up(nodes: int, gpus_per_node: int, cpu: str, memory: str, nodes_file: Path | None, port: int, host: str,
       pod_eviction_timeout_s: float, state_dir: Path, detach: bool, with_prometheus: bool = False,
       prometheus_port: int = 9091, operator_metrics: str = "127.0.0.1:9090", control_plane: str = "embedded",
       allow_remote: bool = False) -> None:
    """Start the local cluster."""
    from loco_local.cluster import is_loopback

    if not is_loopback(host) and not allow_remote:
        raise click.BadParameter(
            f"{host} is off loopback: whoever reaches the API there can run commands on this machine. Add "
            "--allow-remote to serve it there over HTTPS with the kubeconfig's token, or keep the default 127.0.0.1",
            param_hint="--host")
    if control_plane == "kubernetes":
        from loco_local.controlplane import KubeBinaryMissing, kube_bin_dir

        if host != "127.0.0.1" or port != 0:
            raise click.BadParameter("the real control plane listens on loopback, on a free port: drop --host/--port",
                                     param_hint="--control-plane kubernetes")
        try:
            kube_bin_dir()
        except KubeBinaryMissing as exc:
            raise click.ClickException(str(exc)) from None
    if with_prometheus:
        from loco_local.prometheus import INSTALL_HINT, find_binary

        if find_binary() is None:
            raise click.ClickException(f"--prometheus needs the prometheus binary on PATH: {INSTALL_HINT}")
    if not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", operator_metrics):
        raise click.BadParameter(f"{operator_metrics!r} is not HOST:PORT, e.g. 127.0.0.1:9090", param_hint="--operator-metrics")
    prom_options = {"enabled": with_prometheus, "port": prometheus_port, "operator": operator_metrics}
    specs = _node_specs(nodes, gpus_per_node, cpu, memory, nodes_file)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    running = _running_info(state_dir)
    if running is not None:
        raise click.ClickException(
            f"a local cluster already runs with state dir {state_dir} (pid {running['pid']}, {running['url']}); "
            f"stop it with 'loco local down --state-dir {state_dir}'")
    (state_dir / INFO_FILE).unlink(missing_ok=True)
    if detach:
        argv = ["up", "--port", str(port), "--host", host, "--pod-eviction-timeout", str(pod_eviction_timeout_s),
                "--state-dir", str(state_dir), "--operator-metrics", operator_metrics, "--control-plane", control_plane,
                *(["--allow-remote"] if allow_remote else [])]
        if with_prometheus:
            argv += ["--prometheus", "--prometheus-port", str(prometheus_port)]
        if nodes_file is not None:
            argv += ["--nodes-file", str(nodes_file.resolve())]
        else:
            argv += ["--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node), "--cpu", cpu, "--memory", memory]
        _up_detached(state_dir, argv)
    else:
        try:
            asyncio.run(_serve(state_dir, specs, host, port, pod_eviction_timeout_s, prom_options, control_plane,
                               allow_remote))
        except OSError as exc:
            raise click.ClickException(f"cannot start the local cluster on {host}:{port}: {exc}") from None
        except ValueError as exc:  # e.g. a CRD manifest the API server refuses
            raise click.ClickException(str(exc)) from None


def _up_detached(state_dir: Path, up_args: list[str]) -> None:
    """Start ``python -m loco_local.cli <up_args>`` as a daemon; return once it serves."""
    argv = [sys.executable, "-m", "loco_local.cli", *up_args]
    log_path = state_dir / LOG_FILE
    with open(log_path, "ab") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=os.getcwd())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info = _running_info(state_dir)
        if info is not None and info.get("pid") == child.pid:
            _print_how_to(Path(info["kubeconfig"]), info["url"], info)
            click.echo(f"running in the background (pid {child.pid}, log {log_path}); stop it with: "
                       f"loco local down --state-dir {state_dir}")
            return
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise click.ClickException("the local cluster failed to start:\n" + "\n".join(tail))
        time.sleep(0.2)
    child.kill()
    raise click.ClickException(f"the local cluster did not come up within 120s; see {log_path}")


async def _serve(state_dir: Path, specs: list[NodeSpec], host: str, port: int, pod_eviction_timeout_s: float,
                 prom_options: dict[str, Any] | None = None, control_plane: str = "embedded",
                 allow_remote: bool = False) -> None:
    from loco_local.cluster import LocalCluster

    if control_plane == "kubernetes":
        from loco_local.realcluster import RealCluster

        cluster: LocalCluster = RealCluster(state_dir, specs)
    else:
        cluster = LocalCluster(state_dir, specs, host=host, port=port, pod_eviction_timeout_s=pod_eviction_timeout_s,
                               allow_remote=allow_remote)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await cluster.start()
    prom = follower = None
    try:
        opts = prom_options or {}
        if opts.get("enabled"):
            prom, follower = await asyncio.to_thread(_start_prometheus, state_dir, cluster.url, opts, cluster.kubeconfig)
        procs.write_pid_file(state_dir / PID_FILE, os.getpid())
        info = {"pid": os.getpid(), "url": cluster.url, "kubeconfig": str(cluster.kubeconfig),
                "nodes": [s.name for s in specs], "operatorMetrics": opts.get("operator", "127.0.0.1:9090"),
                "prometheus": prom.url if prom else None, "controlPlane": control_plane}
        tmp = state_dir / (INFO_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(state_dir / INFO_FILE)
        _print_how_to(cluster.kubeconfig, cluster.url, info)
        click.echo("press Ctrl-C to stop", err=True)
        await stop.wait()
        click.echo("stopping the local cluster (killing its pods)...", err=True)
    finally:
        if follower is not None:
            follower.stop()
        if prom is not None:
            prom.stop()
        await cluster.stop()
        for name in (INFO_FILE, PID_FILE):
            (state_dir / name).unlink(missing_ok=True)


def _start_prometheus(state_dir: Path, api_url: str, opts: dict[str, Any], kubeconfig: Path) -> tuple[Any, Any]:
    """Start Prometheus (data in ``<state-dir>/prometheus``) and the worker-target follower."""
    from loco_local.prometheus import ALERT_RULES, PodTargetFollower, Prometheus, PrometheusError

    # Loco's alerts too, where the chart's rule file is at hand (a source checkout)
    rules = [ALERT_RULES] if ALERT_RULES.is_file() else []
    prom = Prometheus(state_dir / "prometheus", [opts["operator"]], port=int(opts["port"]), interval_s=15.0,
                      rule_files=rules)
    try:
        prom.start()
    except PrometheusError as exc:
        raise click.ClickException(f"--prometheus: {exc}") from None
    follower = PodTargetFollower(
        lambda: _http(f"{api_url}/api/v1/pods?labelSelector=loco.dev%2Fjob", kubeconfig=kubeconfig).get("items", []),
        prom.workers_file,
        interval_s=2.0).start()
    return prom, follower


# ---------------------------------------------------------------------------------------- down


@local.command("down")
@_state_dir_option
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="Seconds to wait for a clean stop before killing.")
def down(state_dir: Path, timeout_s: float) -> None:
    """Stop the local cluster and kill every pod process it left."""
    state_dir = state_dir.resolve()
    proc = procs.read_pid_file(state_dir / PID_FILE)
    if proc is None:
        click.echo(f"no local cluster is running with state dir {state_dir}")
    else:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
            click.echo(f"local cluster (pid {proc.pid}) stopped")
        except psutil.TimeoutExpired:
            proc.kill()
            click.echo(f"local cluster (pid {proc.pid}) did not stop within {timeout_s:g}s: killed")
    leftovers = procs.kill_pid_files(sorted((state_dir / "pods").glob("*/*/*.pid")))
    if leftovers:
        click.echo(f"killed {leftovers} leftover pod process group(s)")
    for name in (INFO_FILE, PID_FILE):
        (state_dir / name).unlink(missing_ok=True)


# -------------------------------------------------------------------------------------- status


@local.command("status")
@_state_dir_option
def status(state_dir: Path) -> None:
    """Show the cluster's nodes and pods, and how to point kubectl at it."""
    from rich.console import Console
    from rich.table import Table

    state_dir = state_dir.resolve()
    info = _require_running(state_dir)
    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: no wrapping or cut names
    click.echo(f"local cluster running (pid {info['pid']}) at {info['url']}")
    click.echo(f"kubeconfig: {info['kubeconfig']}\n  export KUBECONFIG={info['kubeconfig']}")
    try:
        nodes = _http(info["url"] + "/api/v1/nodes", kubeconfig=info["kubeconfig"]).get("items", [])
        pods = _http(info["url"] + "/api/v1/pods", kubeconfig=info["kubeconfig"]).get("items", [])
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"the API at {info['url']} does not answer: {exc}") from None
    table = Table("NODE", "READY", "SCHEDULABLE", "CPU", "MEMORY", "GPUS", "PODS")
    for node in nodes:
        name = node["metadata"]["name"]
        ready = next((c["status"] for c in node["status"].get("conditions", []) if c["type"] == "Ready"), "Unknown")
        cap = node["status"].get("capacity", {})
        on_node = sum(1 for p in pods if p["spec"].get("nodeName") == name
                      and p.get("status", {}).get("phase") not in ("Succeeded", "Failed"))
        table.add_row(name, ready, "no" if node["spec"].get("unschedulable") else "yes", cap.get("cpu", ""),
                      cap.get("memory", ""), cap.get("nvidia.com/gpu", "0"), str(on_node))
    console.print(table)
    table = Table("NAMESPACE", "POD", "PHASE", "NODE", "IP", "RESTARTS")
    for pod in pods:
        st = pod.get("status", {})
        restarts = sum(c.get("restartCount", 0) for c in st.get("containerStatuses", []))
        table.add_row(pod["metadata"].get("namespace", ""), pod["metadata"]["name"], st.get("phase", ""),
                      pod["spec"].get("nodeName", "") or "<pending>", st.get("podIP", ""), str(restarts))
    console.print(table)


# ---------------------------------------------------------------------------------------- node


@local.command("node")
@click.argument("action", type=click.Choice(["ready", "not-ready", "cordon", "uncordon"]))
@click.argument("name")
@_state_dir_option
def node(action: str, name: str, state_dir: Path) -> None:
    """Fail (not-ready) or revive (ready) a node, or cordon/uncordon it.

    A not-ready node stops its heartbeats and gets the node.kubernetes.io/not-ready taint; after the
    pod eviction timeout its pods fail with reason NodeLost and their processes are killed.
    """
    info = _require_running(state_dir.resolve())
    if info.get("controlPlane") == "kubernetes" and action in ("ready", "not-ready"):
        raise click.ClickException("on the real control plane a node fails for real, not by annotation: stop its node "
                                   "agent (the 'node-<name>' process, logs/node-<name>.log) to lose it")
    patch = {"ready": ready_patch(True), "not-ready": ready_patch(False),
             "cordon": cordon_patch(True), "uncordon": cordon_patch(False)}[action]
    try:
        _http(f"{info['url']}/api/v1/nodes/{name}", "PATCH", patch, kubeconfig=info["kubeconfig"])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise click.ClickException(f"no node named {name!r}; nodes are {info.get('nodes')}") from None
        raise click.ClickException(f"patching node {name} failed: HTTP {exc.code} {exc.read().decode(errors='replace')}")
    click.echo(f"node/{name} {action}")


@local.command("demo")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                default=Path("examples/quickstart.yaml"))
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".loco/demo"),
              show_default=True, help="Where the demo's cluster keeps its state (wiped at start).")
@click.option("--nodes", type=click.IntRange(min=1), default=3, show_default=True, help="Fake nodes.")
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True, help="Give up after this long.")
@click.option("--keep", is_flag=True, help="Keep the cluster up after the job ends (Ctrl-C to stop).")
def demo(manifest: Path, state_dir: Path, nodes: int, timeout_s: float, keep: bool) -> None:
    """Run MANIFEST's TrainingJob end to end: cluster, operator, live progress, summary."""
    from loco_local.demo import run_demo

    sys.exit(run_demo(manifest, state_dir.resolve(), nodes=nodes, timeout_s=timeout_s, keep=keep))


if __name__ == "__main__":  # ``python -m loco_local.cli up ...`` (how --detach starts the daemon)
    local()

"""End-to-end scenarios: the embedded cluster, a real operator process and real worker processes."""

from __future__ import annotations

import copy
import signal
import time
from collections.abc import Iterator
from pathlib import Path
import psutil
import pytest
import yaml

from loco_local.scenario import CHECKPOINT_CLAIM, worker_processes
from loco_local.stack import LocalStack, default_nodes

REPO = Path(__file__).resolve().parents[1]


#: the control planes a scenario module runs on unless it says otherwise (``CONTROL_PLANES = (...)`` in it)
DEFAULT_CONTROL_PLANES = ("embedded",)
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--control-plane", choices=("embedded", "kubernetes", "both"), default="embedded",
        help="run the e2e scenarios on loco_local's embedded API server, on the real Kubernetes control plane "
             "(make kube), or on both; a module lists the planes it supports in CONTROL_PLANES")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "control_plane" not in metafunc.fixturenames:
        return
    chosen = metafunc.config.getoption("--control-plane")
    wanted = ("embedded", "kubernetes") if chosen == "both" else (chosen,)
    supported = getattr(metafunc.module, "CONTROL_PLANES", DEFAULT_CONTROL_PLANES)
    metafunc.parametrize("control_plane", [p for p in wanted if p in supported], scope="module")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, control_plane: str) -> Iterator[LocalStack]:
    state = tmp_path_factory.mktemp(f"loco-e2e-{control_plane}")
    # real control plane: a lost node's workers count as lost 5 s after the node lifecycle controller's own
    # 20 s (the operator's default, 60 s, would only make the scenarios slower)
    env = {"LOCO_NODE_LOST_GRACE_SECONDS": "5"} if control_plane == "kubernetes" else {}
    with LocalStack(state, default_nodes(3), control_plane=control_plane, operator_env=env) as s:
        s.apply(copy.deepcopy(CHECKPOINT_CLAIM))
        yield s
        # on the real control plane the operator ran with the chart's ServiceAccount token: a missing verb shows here
        assert not s.rbac_denials(), "the API refused the operator (a chart RBAC bug):\n" + "\n".join(s.rbac_denials())


def dump_debug(stack: LocalStack, job: str) -> str:
    """Everything useful when a scenario fails: job status, events, pods, operator log tail."""
    # status, events, pods and nodes first, short: CI shows only the head and the tail of a long failure
    obj = stack.get_job(job) or {}
    parts = [f"job {job}: spec.replicas {(obj.get('spec') or {}).get('replicas')}",
             yaml.safe_dump({"status": obj.get("status") or {}}, sort_keys=False)]
    parts += [f"{e.get('type')} {e.get('reason')}: {e.get('message')}" for e in stack.events(job)]
    for pod in stack.list_pods(job):
        # where it is and why it is not further: a Pending pod's PodScheduled condition says what the scheduler found
        status, meta = pod.get("status") or {}, pod["metadata"]
        waiting = [f"{c.get('type')}={c.get('status')} {c.get('reason') or ''} {c.get('message') or ''}".strip()
                   for c in status.get("conditions") or [] if c.get("status") != "True"]
        parts.append(f"pod {meta['name']}: {status.get('phase')} on {(pod.get('spec') or {}).get('nodeName') or '-'}"
                     f" epoch {(meta.get('labels') or {}).get('loco.dev/epoch')} uid {meta.get('uid')}"
                     + (f" deleting since {meta['deletionTimestamp']}" if meta.get("deletionTimestamp") else "")
                     + (f"; {'; '.join(waiting)}" if waiting else ""))
    try:
        for node in stack.resource("v1", "Node").get().items:
            node = node.to_dict()
            ready = next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), {})
            spec = node.get("spec") or {}
            parts.append(f"node {node['metadata']['name']}: Ready={ready.get('status')} {ready.get('reason') or ''}"
                         f"{' cordoned' if spec.get('unschedulable') else ''} taints "
                         f"{[t.get('key') + ':' + t.get('effect', '') for t in spec.get('taints') or []]}")
    except Exception as exc:  # noqa: BLE001 - a debugging aid must not hide the failure it explains
        parts.append(f"(nodes not listed: {exc})")
    log = stack.operator_log
    if log.exists():
        parts.append("--- operator log (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-60:]))
    # every live trainer's thread stacks (the trainer dumps them to its log on SIGUSR1), then the logs' tails
    procs = worker_processes(job)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGUSR1)
        except psutil.Error:
            pass
    if procs:
        time.sleep(1.0)
    for path in sorted(stack.state_dir.glob(f"pods/*/{job}-worker-*/*.log")):
        lines = path.read_text(errors="replace").splitlines()
        lines = [x for x in lines if not x.startswith("frame #")][-80:]
        parts.append(f"--- {path.parent.name}/{path.name} (tail) ---\n" + "\n".join(lines))
    return "\n".join(parts)

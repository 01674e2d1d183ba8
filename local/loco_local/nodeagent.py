"""The node agent of one node of the real control plane: Loco's process kubelet with a node's credential.

``loco local up --control-plane kubernetes`` starts one per node, as its own process::

    python -m loco_local.nodeagent --kubeconfig pki/node-0.kubeconfig --state-dir S --node '{"name": "node-0", ...}' \\
        --address 127.9.0.1 --octet2 9 --pod-ip-block 1

It authenticates as ``system:node:<name>`` (group ``system:nodes``), so the API server's Node authorizer
and NodeRestriction admission hold it to what a kubelet may do: register its own Node, post its status,
renew its Lease in ``kube-node-lease``, and see and update only the pods bound to it. It then runs
:class:`loco_local.kubelet.Kubelet` for the pods the real kube-scheduler binds to the node.

Killing this process is losing the node: its pods die with it (each container gets SIGKILL when its
kubelet dies), its Lease stops, and the real node lifecycle controller marks the node unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import time
from pathlib import Path

from loco_local.apiclient import ApiClient, ApiError, Controller, Informer, Obj, now_rfc3339_micro
from loco_local.kubelet import Kubelet
from loco_local.nodes import LEASE_NAMESPACE, LEASE_PATH, READY_ANNOTATION, NodeSpec, node_object, ready_conditions

log = logging.getLogger("loco_local.nodeagent")

LEASE_DURATION_S = 40
#: how often the full node status is posted even when nothing changed (the Lease is the heartbeat)
STATUS_REPORT_S = 60.0


def registration(spec: NodeSpec, address: str) -> Obj:
    """The Node this agent registers: the embedded cluster's node object, less what NodeRestriction
    forbids a kubelet to set (and the embedded cluster's simulated-failure annotation)."""
    node = node_object(spec, address)
    node["metadata"]["annotations"].pop(READY_ANNOTATION, None)
    return node


class NodeHeartbeat(Controller):
    """Registers the node, then renews its Lease every ``heartbeat_s`` and posts its status."""

    task_name = "node-heartbeat"

    def __init__(self, api: ApiClient, spec: NodeSpec, address: str, *, heartbeat_s: float = 10.0) -> None:
        self.api = api
        self.spec = spec
        self.address = address
        self.heartbeat_s = heartbeat_s
        self.path = f"/api/v1/nodes/{spec.name}"
        self.lease_path = f"{LEASE_PATH}/{LEASE_NAMESPACE}/leases/{spec.name}"

    async def register(self) -> None:
        obj = registration(self.spec, self.address)
        try:
            node = await self.api.create("/api/v1/nodes", obj)
        except ApiError as exc:
            if exc.status != 409:
                raise
            node = await self.api.get(self.path)
        await self.api.patch_status(self.path, obj["status"])
        lease = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.spec.name, "namespace": LEASE_NAMESPACE, "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": self.spec.name, "uid": node["metadata"]["uid"]}]},
            "spec": {"holderIdentity": self.spec.name, "leaseDurationSeconds": LEASE_DURATION_S,
                     "renewTime": now_rfc3339_micro()},
        }
        try:
            await self.api.create(f"{LEASE_PATH}/{LEASE_NAMESPACE}/leases", lease)
        except ApiError as exc:
            if exc.status != 409:
                raise

    async def _run(self) -> None:
        last_status = time.monotonic()
        while True:
            try:
                await self.api.merge_patch(self.lease_path, {"spec": {"renewTime": now_rfc3339_micro(),
                                                                      "holderIdentity": self.spec.name}})
                if time.monotonic() - last_status >= STATUS_REPORT_S:
                    await self.api.patch_status(self.path, {"conditions": ready_conditions(True)})
                    last_status = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the API may be restarting: beat again next round
                log.warning("heartbeat of %s failed: %s", self.spec.name, exc)
            await asyncio.sleep(self.heartbeat_s)


async def run_agent(args: argparse.Namespace) -> None:
    spec = NodeSpec(**json.loads(args.node))
    api = ApiClient.from_kubeconfig(args.kubeconfig)
    heartbeat = NodeHeartbeat(api, spec, args.address, heartbeat_s=args.heartbeat)
    await heartbeat.register()
    selector = f"spec.nodeName={spec.name}"
    pods = Informer(api, "/api/v1/pods", field_selector=selector)
    nodes = Informer(api, "/api/v1/nodes", field_selector=f"metadata.name={spec.name}")
    kubelet = Kubelet(api, pods, nodes, Path(args.state_dir), {spec.name: args.address}, octet2=args.octet2,
                      pod_ip_blocks=range(args.pod_ip_block, args.pod_ip_block + 1), write_hosts=False)
    parts = [pods, nodes, heartbeat, kubelet]
    for part in parts:
        part.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("node agent of %s is running (pods on %s)", spec.name, args.address)
    try:
        await stop.wait()
    finally:
        for part in reversed(parts):
            with contextlib.suppress(Exception):
                await part.stop()
        await api.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loco_local.nodeagent", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True, help="the node's kubeconfig (system:node:<name>)")
    parser.add_argument("--state-dir", required=True, help="the cluster's state directory (pods/, volumes/, hosts)")
    parser.add_argument("--node", required=True, help="the NodeSpec as JSON")
    parser.add_argument("--address", required=True, help="the node's InternalIP on loopback")
    parser.add_argument("--octet2", type=int, required=True, help="second octet of the cluster's loopback range")
    parser.add_argument("--pod-ip-block", type=int, required=True, help="third octet of this node's pod IPs")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds between Lease renewals")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(run_agent(args))


if __name__ == "__main__":
    main()

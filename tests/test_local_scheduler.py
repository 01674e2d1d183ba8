"""Unit tests of the embedded cluster's placement rules (pure function, no API) and node parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from loco_local.nodes import NodeSpec, load_nodes_file, node_object, uniform_nodes
from loco_local.scheduler import pod_requests, schedule, tolerates


def node(name: str, *, cpu: str = "8", memory: str = "32Gi", gpus: int = 0, labels=None, taints=None,
         ready: bool = True, unschedulable: bool = False) -> dict:
    obj = node_object(NodeSpec(name, cpu=cpu, memory=memory, gpus=gpus, labels=labels or {}, taints=taints or []),
                      "127.9.0.1")
    obj["spec"]["unschedulable"] = unschedulable
    if not ready:
        for cond in obj["status"]["conditions"]:
            if cond["type"] == "Ready":
                cond["status"] = "False"
    return obj


def pod(name: str = "p", *, requests=None, limits=None, node_name=None, phase="Pending", **spec) -> dict:
    resources = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    body = {"containers": [{"name": "c", "command": ["true"], "resources": resources}], **spec}
    if node_name:
        body["nodeName"] = node_name
    return {"metadata": {"name": name, "namespace": "default", "uid": name}, "spec": body, "status": {"phase": phase}}


def test_pod_goes_to_least_allocated_node():
    nodes = [node("a"), node("b")]
    bound = [pod("x", requests={"cpu": "4"}, node_name="a", phase="Running")]
    assert schedule(pod(requests={"cpu": "1"}), nodes, bound).node == "b"


def test_finished_pods_free_their_resources():
    nodes = [node("a", cpu="2")]
    bound = [pod("x", requests={"cpu": "2"}, node_name="a", phase="Succeeded")]
    assert schedule(pod(requests={"cpu": "2"}), nodes, bound).node == "a"


def test_insufficient_gpu_message_reads_like_kubernetes():
    nodes = [node("a"), node("b"), node("c")]
    placement = schedule(pod(requests={"nvidia.com/gpu": "1"}), nodes, [])
    assert placement.node is None
    assert placement.message == "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


def test_limits_count_as_requests_when_requests_absent():
    nodes = [node("a", memory="1Gi")]
    placement = schedule(pod(limits={"memory": "2Gi"}), nodes, [])
    assert placement.node is None and "1 Insufficient memory" in placement.message
    assert pod_requests(pod(limits={"cpu": "2"}, requests={"cpu": "500m"}))["cpu"] == pytest.approx(0.5)


def test_gpu_pods_fill_gpu_nodes_and_then_wait():
    nodes = [node("g0", gpus=1), node("g1", gpus=1)]
    first = schedule(pod("p0", requests={"nvidia.com/gpu": "1"}), nodes, [])
    bound = [pod("p0", requests={"nvidia.com/gpu": "1"}, node_name=first.node, phase="Running")]
    second = schedule(pod("p1", requests={"nvidia.com/gpu": "1"}), nodes, bound)
    assert {first.node, second.node} == {"g0", "g1"}
    bound.append(pod("p1", requests={"nvidia.com/gpu": "1"}, node_name=second.node, phase="Running"))
    assert schedule(pod("p2", requests={"nvidia.com/gpu": "1"}), nodes, bound).node is None


def test_cordoned_and_not_ready_nodes_are_skipped():
    nodes = [node("a", unschedulable=True), node("b", ready=False), node("c")]
    assert schedule(pod(), nodes, []).node == "c"
    placement = schedule(pod(), nodes[:2], [])
    assert placement.message == "0/2 nodes are available: 1 node(s) were not ready, 1 node(s) were unschedulable."


def test_node_selector_must_match_labels():
    nodes = [node("a", labels={"zone": "x"}), node("b", labels={"zone": "y"})]
    assert schedule(pod(nodeSelector={"zone": "y"}), nodes, []).node == "b"
    placement = schedule(pod(nodeSelector={"zone": "z"}), nodes, [])
    assert placement.message == "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."


def _affinity(*terms):
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ({"key": "zone", "operator": "In", "values": ["y", "q"]}, {"b"}),
        ({"key": "zone", "operator": "NotIn", "values": ["y"]}, {"a", "c"}),
        ({"key": "zone", "operator": "Exists"}, {"a", "b"}),
        ({"key": "zone", "operator": "DoesNotExist"}, {"c"}),
        ({"key": "rank", "operator": "Gt", "values": ["1"]}, {"b"}),
    ],
)
def test_required_node_affinity_match_expressions(expression, expected):
    nodes = [node("a", labels={"zone": "x", "rank": "1"}), node("b", labels={"zone": "y", "rank": "2"}), node("c")]
    feasible = set()
    for candidate in nodes:
        placement = schedule(pod(affinity=_affinity({"matchExpressions": [expression]})), [candidate], [])
        if placement.node:
            feasible.add(placement.node)
    assert feasible == expected


def test_affinity_match_fields_on_node_name_and_terms_are_ored():
    nodes = [node("a"), node("b"), node("c")]
    by_name = _affinity({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["c"]}]})
    assert schedule(pod(affinity=by_name), nodes, []).node == "c"
    either = _affinity({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["zz"]}]},
                       {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}]})
    assert schedule(pod(affinity=either), nodes, []).node == "b"


def test_taints_need_tolerations():
    taint = {"key": "dedicated", "value": "train", "effect": "NoSchedule"}
    nodes = [node("a", taints=[taint])]
    placement = schedule(pod(), nodes, [])
    assert placement.message == "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: train}."
    tolerated = pod(tolerations=[{"key": "dedicated", "operator": "Equal", "value": "train", "effect": "NoSchedule"}])
    assert schedule(tolerated, nodes, []).node == "a"
    wrong_value = pod(tolerations=[{"key": "dedicated", "value": "serve"}])
    assert schedule(wrong_value, nodes, []).node is None


def test_prefer_no_schedule_taint_does_not_block():
    nodes = [node("a", taints=["soft=1:PreferNoSchedule"])]
    assert schedule(pod(), nodes, []).node == "a"


def test_toleration_matching_rules():
    taint = {"key": "k", "value": "v", "effect": "NoExecute"}
    assert tolerates({"operator": "Exists"}, taint)
    assert tolerates({"key": "k", "operator": "Exists"}, taint)
    assert tolerates({"key": "k", "value": "v", "effect": "NoExecute"}, taint)
    assert not tolerates({"key": "k", "value": "v", "effect": "NoSchedule"}, taint)
    assert not tolerates({"key": "other", "operator": "Exists"}, taint)


def test_too_many_pods():
    nodes = [node("a")]
    nodes[0]["status"]["allocatable"]["pods"] = "1"
    bound = [pod("x", node_name="a", phase="Running")]
    assert schedule(pod(), nodes, bound).message == "0/1 nodes are available: 1 Too many pods."


def test_mixed_reasons_are_counted_per_reason():
    nodes = [node("a", gpus=0), node("b", gpus=1, unschedulable=True), node("c", cpu="1")]
    placement = schedule(pod(requests={"cpu": "2", "nvidia.com/gpu": "1"}), nodes, [])
    assert placement.message == (
        "0/3 nodes are available: 1 Insufficient cpu, 2 Insufficient nvidia.com/gpu, 1 node(s) were unschedulable."
    )
    assert placement.reasons == {"Insufficient nvidia.com/gpu": 2, "Insufficient cpu": 1, "node(s) were unschedulable": 1}


def test_bad_quantity_is_a_value_error():
    with pytest.raises(ValueError):
        schedule(pod(requests={"cpu": "lots"}), [node("a")], [])


def test_uniform_nodes_and_node_object_capacity():
    nodes = uniform_nodes(2, cpu="4", memory="8Gi", gpus=1)
    assert [n.name for n in nodes] == ["node-0", "node-1"]
    obj = node_object(nodes[0], "127.5.0.1")
    assert obj["status"]["capacity"] == {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi",
                                         "nvidia.com/gpu": "1"}
    assert obj["metadata"]["labels"]["kubernetes.io/hostname"] == "node-0"
    assert "node.kubernetes.io/instance-type" in obj["metadata"]["labels"]


def test_nodes_file_expands_counts_and_rejects_bad_fields(tmp_path: Path):
    good = tmp_path / "nodes.yaml"
    good.write_text(
        "nodes:\n"
        "  - {name: gpu, count: 2, gpus: 4, labels: {pool: gpu}, taints: ['gpu=true:NoSchedule']}\n"
        "  - {name: cpu-a, cpu: '16', memory: 64Gi}\n"
    )
    nodes = load_nodes_file(good)
    assert [n.name for n in nodes] == ["gpu-0", "gpu-1", "cpu-a"]
    assert nodes[0].taints == [{"key": "gpu", "value": "true", "effect": "NoSchedule"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: a, cpus: 3}\n")
    with pytest.raises(ValueError, match=r"nodes\[0\] has unknown field\(s\) \['cpus'\]"):
        load_nodes_file(bad)
    with pytest.raises(ValueError, match="memory 'lots'"):
        NodeSpec("a", memory="lots")


# ------------------------------------------------------------------ placement: pack and spread (spec.placement)


def worker(name: str, *, node_name=None, affinity=None, spread=None, job: str = "j") -> dict:
    body = pod(name, requests={"cpu": "1"}, node_name=node_name, phase="Running" if node_name else "Pending")
    body["metadata"]["labels"] = {"loco.dev/job": job}
    if affinity:
        body["spec"]["affinity"] = {"podAffinity": affinity}
    if spread:
        body["spec"]["topologySpreadConstraints"] = [spread]
    return body


JOB = {"matchLabels": {"loco.dev/job": "j"}}


def zoned(name: str, zone: str) -> dict:
    return node(name, labels={"topology.kubernetes.io/zone": zone})


def test_spread_puts_one_worker_per_node_while_nodes_last_and_then_waits():
    spread = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
              "labelSelector": JOB}
    nodes, bound = [node("a"), node("b"), node("c")], []
    for i in range(3):
        placed = schedule(worker(f"w{i}", spread=spread), nodes, bound).node
        bound.append(worker(f"w{i}", spread=spread, node_name=placed))
    assert sorted(p["spec"]["nodeName"] for p in bound) == ["a", "b", "c"]
    # a fourth fits on any node (skew 2-1 = 1); a worker of another job is not counted
    other = worker("x", node_name="a", job="other")
    assert schedule(worker("w3", spread=spread), nodes, bound + [other]).node in ("a", "b", "c")
    # with b and c at 2 and a at 1, a fifth may only go to a... and a, too full, leaves none
    crowded = bound + [worker("w3", node_name="b", spread=spread), worker("w4", node_name="c", spread=spread)]
    assert schedule(worker("w5", spread=spread), nodes, crowded).node == "a"
    placement = schedule(worker("w5", spread=spread), [node("a", cpu="1"), node("b"), node("c")], crowded)
    assert placement.node is None
    assert "2 node(s) didn't match pod topology spread constraints" in placement.message, placement.message
    assert "1 Insufficient cpu" in placement.message


def test_spread_schedule_anyway_only_prefers_the_emptier_domain():
    spread = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
              "labelSelector": JOB}
    bound = [worker("w0", node_name="a"), worker("w1", node_name="a"), worker("w2", node_name="b")]
    assert schedule(worker("w3", spread=spread), [node("a"), node("b"), node("c")], bound).node == "c"
    assert schedule(worker("w3", spread=spread), [node("a"), node("b")], bound).node == "b"
    assert schedule(worker("w3", spread=spread), [node("a")], bound).node == "a"  # not a filter


def test_required_pack_follows_the_first_worker_into_its_zone():
    pack = {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": JOB, "topologyKey": "topology.kubernetes.io/zone"}]}
    nodes = [zoned("a", "z1"), zoned("b", "z2"), zoned("c", "z2")]
    first = schedule(worker("w0", affinity=pack), nodes, []).node  # nothing matches yet: it may go first
    assert first is not None
    zone = {"a": "z1", "b": "z2", "c": "z2"}
    bound = [worker("w0", affinity=pack, node_name=first)]
    for i in range(1, 4):
        placed = schedule(worker(f"w{i}", affinity=pack), nodes, bound).node
        assert zone[placed] == zone[first]
        bound.append(worker(f"w{i}", affinity=pack, node_name=placed))
    # the zone full, the next waits rather than leave it; a node without the zone label never qualifies
    full = [zoned("a", "z1"), zoned("b", "z2", ), zoned("c", "z2")]
    for n in full:
        if zone[n["metadata"]["name"]] == zone[first]:
            n["status"]["allocatable"]["cpu"] = "0"
    placement = schedule(worker("w9", affinity=pack), full, bound)
    assert placement.node is None and "didn't match pod affinity rules" in placement.message, placement.message
    assert schedule(worker("w0", affinity=pack), [node("plain")], []).node is None


def test_preferred_pack_prefers_the_zone_of_the_jobs_workers_but_may_leave_it():
    pack = {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": {"labelSelector": JOB, "topologyKey": "topology.kubernetes.io/zone"}}]}
    nodes = [zoned("a", "z1"), zoned("b", "z2")]
    bound = [worker("w0", node_name="b"), worker("w1", node_name="b")]
    assert schedule(worker("w2", affinity=pack), nodes, bound).node == "b"  # least-allocated alone would pick a
    assert schedule(worker("w2"), nodes, bound).node == "a"
    nodes[1]["status"]["allocatable"]["cpu"] = "2"
    assert schedule(worker("w2", affinity=pack), nodes, bound).node == "a"

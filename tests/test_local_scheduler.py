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

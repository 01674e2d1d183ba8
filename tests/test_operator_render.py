"""The rendered children follow the pod contract (docs/contracts.md)."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from loco_operator.metrics import API_OPERATIONS, OperatorMetrics
from loco_operator.render import JobRef, render_configmap, render_pod, render_service
from loco_operator.spec import TrainingJobSpec
from loco_contract.config import EnvVar, TrainerConfig
from loco_contract.protocol import READY_PATH

REF = JobRef("gpt", "team-a", "uid-9")


def spec(**template) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate({"replicas": 3, "nprocPerWorker": 2, "template": template})


def test_pod_has_contract_labels_env_and_security():
    pod = render_pod(REF, spec(), rank=2, epoch=5, restarts=1, resume_from="/ckpt/team-a/gpt/step-40")
    meta, pod_spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "gpt-worker-2" and meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "loco.dev/job": "gpt", "loco.dev/rank": "2", "loco.dev/epoch": "5", "app.kubernetes.io/managed-by": "loco",
    }
    assert meta["ownerReferences"] == [{
        "apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "name": "gpt", "uid": "uid-9",
        "controller": True, "blockOwnerDeletion": True,
    }]
    assert (pod_spec["hostname"], pod_spec["subdomain"], pod_spec["restartPolicy"]) == ("gpt-worker-2", "gpt", "Never")
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["securityContext"]["runAsNonRoot"] is True and pod_spec["securityContext"]["runAsUser"] == 1000
    (container,) = pod_spec["containers"]
    assert container["name"] == "trainer"
    assert container["command"] == ["python", "-m", "loco_trainer", "--config", "/etc/loco/config.json"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert {"name": "status", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    # Ready = training: the readinessProbe asks the trainer's GET /ready on the named status port
    probe = container["readinessProbe"]
    assert probe["httpGet"] == {"path": READY_PATH, "port": "status"}
    assert probe["periodSeconds"] >= 1 and probe["failureThreshold"] >= 1
    env = {e["name"]: e for e in container["env"]}
    values = {k: v["value"] for k, v in env.items() if "value" in v}
    assert values[EnvVar.REPLICA_INDEX.value] == "2"
    assert values[EnvVar.NUM_REPLICAS.value] == "3"
    assert values[EnvVar.NPROC_PER_WORKER.value] == "2"
    assert values[EnvVar.EPOCH.value] == "5" and values[EnvVar.RESTART_COUNT.value] == "1"
    assert values[EnvVar.RESUME_FROM.value] == "/ckpt/team-a/gpt/step-40"
    assert values["MASTER_ADDR"] == "gpt-worker-0.gpt.team-a.svc" and values["MASTER_PORT"] == "29500"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    mounts = {m["name"]: (m["mountPath"], m["readOnly"]) for m in container["volumeMounts"]}
    assert mounts == {"loco-config": ("/etc/loco", True), "loco-membership": ("/var/run/secrets/loco.dev/membership", True)}
    assert pod_spec["volumes"][0]["configMap"]["name"] == "gpt-trainer"
    # the membership token comes from the job's Secret, as a file: never in the spec or the environment
    assert pod_spec["volumes"][1]["secret"]["secretName"] == "gpt-membership"
    assert values["LOCO_MEMBERSHIP_TOKEN_FILE"] == "/var/run/secrets/loco.dev/membership/token"


def test_template_is_merged_and_contract_labels_win():
    tpl = {
        "image": "registry/loco:2", "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": {"nvidia.com/gpu": 1}},
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "MASTER_PORT", "value": "29600"}],
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"x": 1}},
        "priorityClassName": "high", "schedulerName": "volcano",
        "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}}],
        "volumeMounts": [{"name": "ckpt", "mountPath": "/checkpoints"}],
        "labels": {"team": "a", "loco.dev/rank": "99"}, "annotations": {"note": "x"},
    }
    pod = render_pod(REF, spec(**tpl), rank=0, epoch=0)
    pod_spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert container["image"] == "registry/loco:2" and container["imagePullPolicy"] == "IfNotPresent"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1"}}  # a quantity: the client takes strings only
    env = [(e["name"], e.get("value")) for e in container["env"]]
    assert ("NCCL_DEBUG", "INFO") in env and ("MASTER_PORT", "29600") in env and ("MASTER_PORT", "29500") not in env
    assert pod_spec["nodeSelector"] == {"pool": "gpu"} and pod_spec["tolerations"][0]["key"] == "gpu"
    assert pod_spec["affinity"] == {"nodeAffinity": {"x": 1}}
    assert (pod_spec["priorityClassName"], pod_spec["schedulerName"]) == ("high", "volcano")
    assert [v["name"] for v in pod_spec["volumes"]] == ["loco-config", "loco-membership", "ckpt"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/etc/loco", "/var/run/secrets/loco.dev/membership", "/checkpoints"]
    assert pod["metadata"]["labels"]["team"] == "a" and pod["metadata"]["labels"]["loco.dev/rank"] == "0"
    assert pod["metadata"]["annotations"] == {"note": "x"}


def test_service_is_headless_and_configmap_holds_trainer_config():
    svc = render_service(REF)
    assert svc["metadata"]["name"] == "gpt"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"loco.dev/job": "gpt"}
    cm = render_configmap(REF, spec())
    assert cm["metadata"]["name"] == "gpt-trainer"
    config = TrainerConfig.model_validate(json.loads(cm["data"]["config.json"]))
    assert (config.job_name, config.namespace) == ("gpt", "team-a")


def test_operator_metrics_track_phases_transitions_and_restarts():
    metrics = OperatorMetrics()
    fresh = {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples if s.name == "loco_operator_job_transitions_total"
    }
    # every transition a job can make is exported at 0 from the start, so increase() sees the first one;
    # none out of a terminal phase
    assert fresh[(("from", ""), ("to", "Pending"))] == 0 and fresh[(("from", "Running"), ("to", "Restarting"))] == 0
    assert fresh[(("from", "Restarting"), ("to", "Running"))] == 0 and fresh[(("from", "Suspended"), ("to", "Pending"))] == 0
    assert set(fresh.values()) == {0.0} and len(fresh) == 26
    assert not [k for k in fresh if dict(k)["from"] in ("Succeeded", "Failed") or dict(k)["from"] == dict(k)["to"]]
    errors = {s.labels["operation"]: s.value
              for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
              for s in family.samples if s.name == "loco_operator_api_errors_total"}
    assert errors == dict.fromkeys(API_OPERATIONS, 0.0)
    metrics.observe_job("ns/a", None, "Pending")
    metrics.observe_job("ns/a", "Pending", "Running")
    metrics.observe_job("ns/b", None, "Running")
    metrics.observe_job("ns/a", "Running", "Restarting", restarts_added=1)
    metrics.forget_job("ns/b")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert samples[("loco_operator_jobs", (("phase", "Restarting"),))] == 1
    assert samples[("loco_operator_jobs", (("phase", "Running"),))] == 0
    assert samples[("loco_operator_job_transitions_total", (("from", "Pending"), ("to", "Running")))] == 1
    assert samples[("loco_operator_job_transitions_total", (("from", ""), ("to", "Pending")))] == 1
    assert samples[("loco_operator_restarts_total", ())] == 1


def test_every_api_call_of_the_handlers_has_its_api_errors_series_from_the_start() -> None:
    """The handlers name each Kubernetes API call (the ``operation`` of ``loco_operator_api_errors_total``);
    metrics.API_OPERATIONS must list every one, or its first failure would be invisible to rate()."""
    import re
    from pathlib import Path

    import loco_operator.handlers as handlers
    import loco_operator.population.handlers as population_handlers

    source = "".join(Path(m.__file__).read_text() for m in (handlers, population_handlers))
    named = set(re.findall(r'(?:_call|_create|_delete)\(ctx, "(\w+)"|_get\("(\w+)"', source))
    operations = {a or b for a, b in named}
    assert len(operations) >= 15 and operations == set(API_OPERATIONS)
    # every call goes through a helper that names it: no bare client call with a computed name
    assert not re.findall(r'(?:_call|_create|_delete)\(ctx, [a-z]', source.replace("_call(ctx, operation", ""))


def probes(fault_detection: dict | None):
    """The probe settings a worker reads from its config, as the operator renders it for this faultDetection."""
    from loco_contract.config import TrainerConfig
    from loco_operator.render import config_json

    spec = TrainingJobSpec.model_validate({"replicas": 2, **({"faultDetection": fault_detection} if fault_detection else {})})
    return TrainerConfig.model_validate_json(config_json(JobRef("default", "j", "uid"), spec)).probes


def test_stall_threshold_follows_the_hang_timeout_floor() -> None:
    """Workers report a stalled connection after half of faultDetection.hangTimeoutFloorSeconds
    (at most 5 s), so the sample reaches the detector before its hang-comm timeout expires."""
    assert probes(None).stall_after_s == 5.0  # default floor 10 s
    assert probes({"hangTimeoutFloorSeconds": 3}).stall_after_s == 1.5
    assert probes({"hangTimeoutFloorSeconds": 60, "warmupHangTimeoutSeconds": 300}).stall_after_s == 5.0


def test_ring_all_reduce_is_passed_to_the_workers() -> None:
    """faultDetection.ringAllReduce reaches the trainer through its config (off by default)."""
    assert probes(None).ring_all_reduce is False and probes({"ringAllReduce": False}).ring_all_reduce is False
    assert probes({"ringAllReduce": True}).ring_all_reduce is True


def test_no_fault_setting_travels_in_the_environment() -> None:
    """The trainer reads the detector's settings from its config, never from LOCO_* variables (issue 23)."""
    from loco_operator.render import worker_env

    spec = TrainingJobSpec.model_validate({"replicas": 2, "faultDetection": {"ringAllReduce": True, "probeBytes": 8192}})
    names = {e["name"] for e in worker_env(JobRef("default", "j", "uid"), spec, 0, 0, 0, "")}
    assert not {n for n in names if "STALL" in n or "PROBE" in n or "RING" in n}, names


def test_live_resize_joiner_pod_name_rendezvous_and_flags() -> None:
    """A live-capable job's pods say LOCO_LIVE_RESIZE=1; a joiner of a live grow has its own name
    (metadata.name and hostname), LOCO_JOIN=1 and the epoch's rendezvous (rank 0 by pod name)."""
    from loco_contract.config import RuntimeEnv

    live = TrainingJobSpec.model_validate({"replicas": 3, "elastic": {"minReplicas": 2}})
    assert live.live_membership
    plain = RuntimeEnv.from_environ(_values(render_pod(REF, live, rank=1, epoch=0)))
    assert (plain.live_resize, plain.join, plain.master_addr, plain.master_port) == (
        True, False, "gpt-worker-0.gpt.team-a.svc", 29500)
    pod = render_pod(REF, live, rank=2, epoch=6, num_replicas=3, name="gpt-worker-1", join=True,
                     master_addr=REF.pod_dns_by_name("gpt-worker-4"), master_port=29507)
    assert pod["metadata"]["name"] == pod["spec"]["hostname"] == "gpt-worker-1"
    assert (pod["metadata"]["labels"]["loco.dev/rank"], pod["metadata"]["labels"]["loco.dev/epoch"]) == ("2", "6")
    joiner = RuntimeEnv.from_environ(_values(pod))
    assert (joiner.join, joiner.live_resize, joiner.replica_index, joiner.num_replicas, joiner.epoch) == (True, True, 2, 3, 6)
    assert (joiner.master_addr, joiner.master_port) == ("gpt-worker-4.gpt.team-a.svc", 29507)
    # not live-capable: two processes per pod (spec()), or liveResize off
    off = TrainingJobSpec.model_validate({"replicas": 3, "elastic": {"minReplicas": 2, "liveResize": False}})
    for s in (spec(), off):
        assert _values(render_pod(REF, s, rank=0, epoch=0))[EnvVar.LIVE_RESIZE.value] == "0"


def _values(pod: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}


def test_probe_interval_and_size_are_passed_to_the_workers() -> None:
    """faultDetection.probeIntervalSeconds and probeBytes reach the trainer through its config (1 s by
    default, 0 = transfers at every log interval; 4 KiB); a value out of range is refused, naming the field."""
    assert (probes(None).probe_interval_s, probes(None).probe_bytes) == (1.0, 4096)
    assert probes({"probeIntervalSeconds": 0}).probe_interval_s == 0.0
    chosen = probes({"probeIntervalSeconds": 7.5, "probeBytes": 1 << 20})
    assert (chosen.probe_interval_s, chosen.probe_bytes) == (7.5, 1 << 20)
    for bad, field in (({"probeIntervalSeconds": -1}, "probeIntervalSeconds|probe_interval_seconds"),
                       ({"probeBytes": 2}, "probeBytes|probe_bytes")):
        with pytest.raises(ValueError, match=field):
            TrainingJobSpec.model_validate({"replicas": 2, "faultDetection": bad})


def test_membership_secret_and_network_policy():
    from loco_operator.render import JobRef, render_membership_secret, render_network_policy

    job = JobRef("gpt", "team-a", "uid-1")
    secret = render_membership_secret(job, "tok")
    assert secret["metadata"]["name"] == "gpt-membership" and secret["stringData"] == {"token": "tok"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"  # collected with the job
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "loco-system"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "loco-operator"}}}
    policy = render_network_policy(job, [operator])
    assert policy["spec"]["podSelector"] == {"matchLabels": {"loco.dev/job": "gpt"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"loco.dev/job": "gpt"}}}]},
                                         {"from": [operator]}]
    assert render_network_policy(job, [])["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {"loco.dev/job": "gpt"}}}]}]


def test_placement_pack_is_a_pod_affinity_and_spread_a_topology_spread_constraint_over_the_jobs_workers() -> None:
    def placed(placement, **template):
        parsed = TrainingJobSpec.model_validate({"replicas": 3, "placement": placement, "template": template})
        return render_pod(REF, parsed, 0, 0, avoid_nodes=["bad-node"])["spec"]

    job = {"matchLabels": {"loco.dev/job": "gpt"}}
    spread = placed({"spread": {}})
    assert spread["topologySpreadConstraints"] == [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                    "whenUnsatisfiable": "DoNotSchedule", "labelSelector": job}]
    loose = placed({"spread": {"topologyKey": "topology.kubernetes.io/zone", "maxSkew": 2, "required": False}})
    assert loose["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "ScheduleAnyway"
    pack = placed({"pack": {}}, affinity={"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 5, "podAffinityTerm": {"labelSelector": {}, "topologyKey": "rack"}}]}})
    assert pack["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 5, "podAffinityTerm": {"labelSelector": {}, "topologyKey": "rack"}},  # the template's kept
        {"weight": 100, "podAffinityTerm": {"labelSelector": job, "topologyKey": "topology.kubernetes.io/zone"}}]
    # the avoided node still applies beside the placement
    assert pack["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    strict = placed({"pack": {"topologyKey": "kubernetes.io/hostname", "required": True}})
    assert strict["affinity"]["podAffinity"] == {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": job, "topologyKey": "kubernetes.io/hostname"}]}
    unplaced = placed(None)
    assert "topologySpreadConstraints" not in strict and "topologySpreadConstraints" not in unplaced
    assert list(unplaced["affinity"]) == ["nodeAffinity"]  # only the avoided node

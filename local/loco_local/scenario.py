"""What the e2e scenarios and the benchmarks run on this machine: a TrainingJob sized for a small host, the
checkpoint claim it mounts, and the worker processes it became (found by the environment the operator set)."""

from __future__ import annotations

import copy
import os
from typing import Any

#: the shared checkpoint claim of :func:`small_job` (a real scheduler keeps a pod whose claim is missing Pending)
CHECKPOINT_CLAIM = {
    "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "e2e-checkpoints"},
    "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
}


def small_job(name: str, *, replicas: int = 2, steps: int = 40, algorithm: str = "diloco", **overrides: Any) -> dict[str, Any]:
    """A TrainingJob small enough for a 2-core CI machine, checkpointing to a shared PVC."""
    doc = {
        "apiVersion": "loco.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "algorithm": {"name": algorithm, **({"syncEvery": 10} if algorithm != "ddp" else {})},
            "model": {"gpt": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}},
            "data": {"maxBytes": 300_000},
            "training": {"steps": steps, "batchSize": 4, "seqLen": 32, "warmupSteps": 2, "evalEvery": 20,
                         "evalBatches": 2, "logEvery": 5},
            "checkpoint": {"path": "/checkpoints", "everySteps": 10, "keep": 2},
            "runPolicy": {"backoffLimit": 2},
            # Thresholds for a shared, CPU-starved host (docs/fault-detection.md, "Loaded hosts"): the
            # 2-core CI machine runs every worker, the operator and the cluster, and a rank starved of
            # CPU for a few tenths of a second there is noise, not a fault. A scenario about fault
            # detection passes its own faultDetection (it replaces this one).
            "faultDetection": {"minLatenessSeconds": 0.8, "minLinkExcessSeconds": 0.1},
            "template": {
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "e2e-checkpoints"}}],
                "volumeMounts": [{"name": "ckpt", "mountPath": "/checkpoints"}],
            },
        },
    }
    spec = doc["spec"]
    for dotted, value in overrides.items():
        node = spec
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = copy.deepcopy(value)
    return doc


def worker_processes(job: str) -> list[Any]:
    """The trainer processes of a job (``psutil.Process``, found by the env the operator injected)."""
    import psutil  # the operator extra's; only scenarios on this machine need it

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if env.get("LOCO_JOB_NAME") == job and proc.pid != os.getpid():
            found.append(proc)
    return found

"""Every file in examples/ is applied as a user would: the whole file by the real kubectl with a server-side
dry run on both control planes (schema, CEL rules, the PVCs beside the job). The CPU examples also run to
Succeeded on the embedded cluster (e2e/test_examples_run.py); the GPU ones need GPU nodes and GPT-2 shards, so
they stop here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from e2e.conftest import REPO
from loco_local.stack import LocalStack

CONTROL_PLANES = ("embedded", "kubernetes")
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


KINDS = ("TrainingJob", "Population")


def _job(path: Path) -> dict:
    """The file's TrainingJob, or its Population."""
    return next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] in KINDS)


def _job_spec(path: Path) -> dict:
    """The TrainingJob spec the file runs (a Population's member template)."""
    main = _job(path)
    return main["spec"]["template"] if main["kind"] == "Population" else main["spec"]


def _needs_gpu(path: Path) -> bool:
    resources = _job_spec(path).get("template", {}).get("resources", {})
    return any("nvidia.com/gpu" in (resources.get(kind) or {}) for kind in ("limits", "requests"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_accepted_by_a_server_side_dry_run(stack: LocalStack, path: Path) -> None:
    main = _job(path)
    name = main["metadata"]["name"]
    done = stack.kubectl("apply", "--server-side", "--dry-run=server", "-f", str(path), check=False)
    assert done.returncode == 0, done.stderr
    assert f"{main['kind'].lower()}.loco.dev/{name} serverside-applied (server dry run)" in done.stdout, done.stdout
    assert stack.get_job(name) is None  # a dry run stores nothing

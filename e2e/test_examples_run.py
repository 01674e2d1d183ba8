"""Every CPU example in examples/ runs to Succeeded on the embedded cluster, applied from its file as a user would
(the GPU ones are dry-run on both control planes in e2e/test_examples.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.conftest import REPO, dump_debug
from e2e.test_examples import EXAMPLES, _job, _needs_gpu
from loco_local.stack import LocalStack

CONTROL_PLANES = ("embedded",)
TIMEOUT_S = 420
#: run to Succeeded by another scenario (file -> (its module, its test)); not run again here
RUN_ELSEWHERE = {"quickstart.yaml": ("test_foundation.py", "test_quickstart_succeeds_with_checkpoint_on_disk"),
                 "population-local.yaml": ("test_population.py", "test_a_population_exploits_and_explores")}
CPU_EXAMPLES = [p for p in EXAMPLES if not _needs_gpu(p) and p.name not in RUN_ELSEWHERE]


def test_the_examples_run_elsewhere_still_are() -> None:
    for file, (module, test) in RUN_ELSEWHERE.items():
        source = (REPO / "e2e" / module).read_text()
        assert f"def {test}(" in source and f'"{file}"' in source, (file, module, test)


@pytest.mark.parametrize("path", CPU_EXAMPLES, ids=[p.name for p in CPU_EXAMPLES])
def test_every_cpu_example_runs_to_succeeded(stack: LocalStack, path: Path) -> None:
    job = _job(path)
    name = job["metadata"]["name"]
    stack.apply_file(path)
    try:
        finished = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout_s=TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(dump_debug(stack, name)) from None
    status = finished["status"]
    assert status["phase"] == "Succeeded", dump_debug(stack, name)
    assert status["step"] == job["spec"]["training"]["steps"], status
    stack.kubectl("delete", "tj", name, "--wait=true", timeout_s=120)

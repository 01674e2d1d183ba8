"""`loco operator run` options that matter for running several replicas."""

from __future__ import annotations

from click.testing import CliRunner

from loco_operator.cli import operator, peering_priority


def test_peering_priority_differs_between_replicas_and_is_stable() -> None:
    a = peering_priority(None, {"POD_NAME": "loco-operator-7d9f-abcde"})
    b = peering_priority(None, {"POD_NAME": "loco-operator-7d9f-fghij"})
    assert a != b
    assert a == peering_priority(None, {"POD_NAME": "loco-operator-7d9f-abcde"})
    assert 1 <= a <= 1_000_000 and 1 <= b <= 1_000_000


def test_explicit_priority_wins() -> None:
    assert peering_priority(42, {"POD_NAME": "x"}) == 42
    assert peering_priority(0, {"POD_NAME": "x"}) == 0


def test_run_help_documents_priority_and_peering() -> None:
    result = CliRunner().invoke(operator, ["run", "--help"])
    assert result.exit_code == 0
    assert "--priority" in result.output and "--peering" in result.output

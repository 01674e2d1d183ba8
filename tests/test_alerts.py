"""Loco's alerting rules (charts/loco-operator/alerts/loco.rules.yaml): well-formed and honest.

Every expression parses (promql-parser) and reads only metrics Loco's code exports (the same check as
the dashboards'); every alert has a severity and says what happened and what to do; ``promtool test rules``
runs tests/alerts/loco.rules.test.yaml, which feeds each alert synthetic series and says when it must fire,
with which labels and rendered annotations, and when it must not. The chart ships
the file verbatim as a PrometheusRule. ``e2e/test_prometheus.py`` loads it into a real Prometheus and
checks that a worker crash fires ``LocoWorkerFault`` for that job, and nothing else.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

pytest.importorskip("promql_parser", reason="promql-parser is in the dev extra")

from test_dashboards import REPO, exported_series, metric_names  # noqa: E402

RULES_FILE = REPO / "charts" / "loco-operator" / "alerts" / "loco.rules.yaml"
#: promtool unit tests of every alert: synthetic series, when each must fire (labels, rendered annotations) and not
RULE_TESTS = REPO / "tests" / "alerts" / "loco.rules.test.yaml"
SEVERITIES = {"critical", "warning", "info"}
#: Prometheus template references an annotation may use: labels the expression keeps, and $value
TEMPLATE_REF = re.compile(r"\$labels\.(\w+)")


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def kept_labels(expr: str) -> set[str] | None:
    """The labels an expression's result keeps when its outermost aggregation says so (``sum by (a, b)``),
    else None (unknown: not checked)."""
    match = re.match(r"\s*\(?\s*(?:sum|count|max|min|avg)\s+by\s*\(([^)]*)\)", expr)
    return {name.strip() for name in match.group(1).split(",") if name.strip()} if match else None


def test_every_rule_is_an_alert_with_a_unique_name_severity_summary_and_description() -> None:
    found = rules()
    assert len(found) >= 6
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names)) and all(name.startswith("Loco") for name in names)
    for rule in found:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip() and len(rule["annotations"]["description"]) > 60, rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_every_expression_parses_and_reads_only_exported_metrics() -> None:
    exported = exported_series()
    for rule in rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']} selects no series"
        assert names <= exported.keys(), f"{rule['alert']} reads metrics Loco does not export: {names - exported.keys()}"


def test_annotations_use_only_labels_the_expression_keeps() -> None:
    """``{{ $labels.job }}`` renders empty when the expression aggregated ``job`` away."""
    for rule in rules():
        kept = kept_labels(rule["expr"])
        if kept is None:
            continue
        text = " ".join(rule["annotations"].values())
        assert set(TEMPLATE_REF.findall(text)) <= kept, f"{rule['alert']}: {set(TEMPLATE_REF.findall(text)) - kept}"


def test_the_label_check_catches_an_aggregated_away_label() -> None:
    assert kept_labels("sum by (namespace, kind) (increase(x[5m])) > 0") == {"namespace", "kind"}
    assert "job" not in kept_labels("sum by (namespace, kind) (increase(x[5m])) > 0")
    assert kept_labels("(time() - y) > 3600") is None


def test_the_chart_ships_the_rules_verbatim_as_a_prometheusrule() -> None:
    from test_chart import by_kind, render, validate_object

    assert not by_kind(render(), "PrometheusRule")  # off by default: it needs the Prometheus Operator CRDs
    objects = render({"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}})
    (rule,) = by_kind(objects, "PrometheusRule")
    validate_object(rule)
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]
    # Helm did not eat Prometheus's own templates
    assert "{{ $labels.job }}" in yaml.safe_dump(rule["spec"], width=1000)


def test_promtool_unit_tests_cover_every_alert_and_pass() -> None:
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in rules()}, "every alert needs a promtool case"
    promtool = shutil.which("promtool")
    if promtool is None:
        # `make test` installs promtool first (`make tools`, as root in CI): this skips only outside it.
        pytest.skip("promtool is not installed (Debian package 'prometheus'; 'make tools' installs it)")
    done = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout

"""The Grafana dashboards in charts/loco-operator/dashboards: generated, well-formed, and honest.

Honest means every PromQL expression parses (promql-parser) and references only metrics that Loco's
code really exports: the exported names are read from the live registries of ``OperatorMetrics`` and
``TrainerMetrics``, expanded to the series Prometheus sees (``_total``, ``_bucket``...).
``e2e/test_prometheus.py`` goes further and has a real Prometheus evaluate every query.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

promql = pytest.importorskip("promql_parser", reason="promql-parser is in the dev extra")
pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is in the dev extra")
from grafana_foundation_sdk.models.dashboard import Dashboard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = REPO / "charts" / "loco-operator" / "dashboards"
TITLES = {"training-jobs.json": "Loco / Training jobs", "operator.json": "Loco / Operator"}

#: Grafana's built-in interval variables, replaced by a sample value before parsing PromQL.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

#: prometheus_client metric type -> suffixes of the series it exposes (Counter names lose "_total" first).
SERIES_SUFFIXES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
}


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate_dashboards", REPO / "charts" / "generate_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def exported_series() -> dict[str, str]:
    """Series name -> the class exporting it, for every metric family Loco's metric classes register
    (read from live registries, so helpers that build the metric objects are seen too)."""
    from loco_operator.metrics import OperatorMetrics
    from loco_trainer.metrics import TrainerMetrics

    series: dict[str, str] = {}
    for owner in (OperatorMetrics(), TrainerMetrics("job", "ns", 0, 0)):
        for family in owner.registry.collect():
            kind = {"counter": "Counter", "gauge": "Gauge", "histogram": "Histogram", "summary": "Summary",
                    "info": "Info", "stateset": "Enum"}.get(family.type, "Gauge")
            base = family.name if kind != "Info" else family.name.removesuffix("_info")
            for suffix in SERIES_SUFFIXES[kind]:
                series[base + suffix] = type(owner).__name__
    return series


def dashboards() -> dict[str, dict[str, Any]]:
    files = sorted(DASHBOARD_DIR.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARD_DIR}"
    return {f.name: json.loads(f.read_text()) for f in files}


def panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    for panel in model.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expressions(model: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target, annotation and label_values() variable query."""
    for panel in panels(model):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for annotation in model.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"]
    for variable in model.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: expected label_values(selector, label), got {query!r}"
            yield f"variable {variable['name']!r}", match.group(1)


def parse(expr: str) -> Any:
    for variable, sample in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, sample)
    return promql.parse(expr)


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects."""
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql.walk(parse(expr), visit)
    return names


# -------------------------------------------------------------------------------------- tests


def test_committed_dashboards_equal_the_generator_output() -> None:
    generator = _generator()
    generated = {spec.filename: generator.render(spec) for spec in generator.all_dashboards()}
    committed = {f.name: f.read_text() for f in sorted(DASHBOARD_DIR.glob("*.json"))}
    assert committed == generated, "dashboards are stale: run python charts/generate_dashboards.py"


def test_dashboards_are_valid_grafana_models() -> None:
    models = dashboards()
    assert {name: m["title"] for name, m in models.items()} == TITLES
    uids = [m["uid"] for m in models.values()]
    assert len(set(uids)) == len(uids)
    for name, model in models.items():
        parsed = Dashboard.from_json(model)  # Grafana's own schema types read it back
        assert parsed.title == model["title"] and parsed.panels, name
        assert model["schemaVersion"] >= 36, name
        assert "loco" in model["tags"], name


def test_datasource_is_a_template_variable_everywhere() -> None:
    for name, model in dashboards().items():
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus", name
        refs = [p["datasource"] for p in panels(model) if p["type"] != "row"]
        refs += [t["datasource"] for p in panels(model) for t in p.get("targets", [])]
        refs += [a["datasource"] for a in model["annotations"]["list"]]
        refs += [v["datasource"] for v in variables.values() if v["type"] == "query"]
        assert refs and all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs), f"{name}: hard-coded datasource"


def test_namespace_and_job_variables_exist_and_filter_queries() -> None:
    for name, model in dashboards().items():
        variables = {v["name"]: v for v in model["templating"]["list"]}
        for var in ("namespace", "job"):
            assert variables[var]["type"] == "query" and variables[var]["multi"] and variables[var]["includeAll"], name
        assert '$namespace' in variables["job"]["query"]["query"], "job choices follow the chosen namespace"
        trainer_exprs = [e for where, e in expressions(model) if "loco_trainer_" in e and not where.startswith("variable")]
        assert trainer_exprs, name
        for expr in trainer_exprs:
            for selector in re.findall(r"loco_trainer_\w+\{([^}]*)\}", expr):
                assert 'namespace=~"$namespace"' in selector and 'job=~"$job"' in selector, f"{name}: unfiltered {expr}"


def test_every_promql_expression_parses() -> None:
    count = 0
    for name, model in dashboards().items():
        for where, expr in expressions(model):
            try:
                parse(expr)
            except ValueError as exc:
                pytest.fail(f"{name} {where}: {exc}: {expr}")
            count += 1
    assert count >= 20


def test_every_metric_a_dashboard_queries_is_exported_by_the_code() -> None:
    exported = exported_series()
    assert "loco_trainer_step_seconds_bucket" in exported and "loco_operator_restarts_total" in exported
    unknown = {}
    for name, model in dashboards().items():
        for where, expr in expressions(model):
            for metric in metric_names(expr) - exported.keys():
                unknown.setdefault(metric, []).append(f"{name} {where}")
    assert unknown == {}, f"dashboards query metrics no code exports: {unknown}"


def test_metric_check_rejects_an_invented_metric() -> None:
    """Guards the check above: a made-up series is found in the expression and absent from the code."""
    names = metric_names('sum by (job) (rate(loco_trainer_invented_total{job=~"$job"}[$__rate_interval])) / loco_trainer_step')
    assert names == {"loco_trainer_invented_total", "loco_trainer_step"}
    assert "loco_trainer_invented_total" not in exported_series()
    with pytest.raises(ValueError):
        parse("sum(rate(loco_trainer_step[5m])")


def test_panels_fit_the_grid_without_overlap() -> None:
    for name, model in dashboards().items():
        cells: dict[tuple[int, int], str] = {}
        for panel in panels(model):
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{name}: {panel['title']!r} overflows the 24-column grid"
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{name}: {panel['title']!r} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = panel["title"]


def test_every_panel_is_described_and_queries_something() -> None:
    for name, model in dashboards().items():
        for panel in panels(model):
            if panel["type"] == "row":
                continue
            assert panel.get("description"), f"{name}: {panel['title']!r} has no description"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert ref_ids and len(set(ref_ids)) == len(ref_ids), f"{name}: {panel['title']!r} targets"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{name}: {panel['title']!r} has no unit"

"""Fuzz the embedded API server with schemathesis against its own OpenAPI v3 documents: no 500s, no hangs.

The server runs in a thread of this process (its own event loop) with the project's TrainingJob CRD
registered. The documents it serves (``/openapi/v3/api/v1`` and ``/openapi/v3/apis/loco.dev/v1alpha1``)
are merged into one schema; for every operation schemathesis generates cases (valid bodies and query
parameters, then invalid ones) and each is sent with the bearer token. A failure is a 5xx answer, or no
answer within ``--request-timeout`` seconds (a hang). Watches are not declared by the documents, so
no case opens a stream; the request timeout would end one anyway.

Half the cases of an operation on one object are aimed at an object that exists (``default/fuzz``,
re-created when a case deleted it), so PUT, PATCH and DELETE get past the 404.

``tests/test_fuzz_apiserver.py`` runs a bounded, derandomized pass of this in CI; this script runs a
longer one and writes its section of docs/benchmarks.md::

    .venv/bin/python bench/fuzz_apiserver.py --examples 60
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests

DOC_NAME = "fuzz_apiserver"
NS = "default"
TARGET = "fuzz"  # the existing object half of the one-object cases aim at
GROUP_VERSIONS = ("api/v1", "apis/loco.dev/v1alpha1")
# what the bounded CI pass covers (the benchmark covers every kind of the two documents)
CORE_KINDS = r"/(configmaps|pods|namespaces|trainingjobs)(/\{name\})?$"


# ---------------------------------------------------------------------------------------------- server


@dataclasses.dataclass
class Running:
    url: str
    token: str
    server: Any

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextmanager
def running_server(with_crd: bool = True) -> Iterator[Running]:
    """An embedded API server serving in a thread of its own (its own event loop); the TrainingJob CRD
    registered when ``with_crd``."""
    from loco_local.apiserver import APIServer

    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        srv = APIServer(port=0)
        await srv.start()
        holder["server"], holder["stop"] = srv, asyncio.Event()
        started.set()
        await holder["stop"].wait()
        await srv.stop()

    def target() -> None:
        loop = asyncio.new_event_loop()
        holder["loop"] = loop
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            holder["error"] = exc
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="fuzzed-apiserver", daemon=True)
    thread.start()
    if not started.wait(30) or "error" in holder:
        raise RuntimeError(f"the API server did not start: {holder.get('error')!r}")
    srv = holder["server"]
    running = Running(srv.url, srv.token, srv)
    try:
        if with_crd:
            from loco_operator.crd import build_crd

            r = requests.post(f"{running.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                              json=build_crd(), headers=running.headers, timeout=30)
            assert r.status_code == 201, r.text
        yield running
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(30)


# ---------------------------------------------------------------------------------------------- schema


def served_group_versions(base_url: str, headers: dict[str, str]) -> list[str]:
    """Every group-version ``/openapi/v3`` lists (``api/v1``, ``apis/apps/v1``, ...)."""
    r = requests.get(f"{base_url}/openapi/v3", headers=headers, timeout=30)
    r.raise_for_status()
    return sorted(r.json()["paths"])


def merged_document(base_url: str, headers: dict[str, str], group_versions: tuple[str, ...] | list[str] = GROUP_VERSIONS
                    ) -> dict[str, Any]:
    """The served v3 documents of ``group_versions`` as one OpenAPI document."""
    merged: dict[str, Any] = {}
    for gv in group_versions:
        r = requests.get(f"{base_url}/openapi/v3/{gv}", headers=headers, timeout=30)
        r.raise_for_status()
        doc = r.json()
        if not merged:
            merged = doc
        else:
            merged["paths"].update(doc["paths"])
            merged["components"]["schemas"].update(doc["components"]["schemas"])
    merged["servers"] = [{"url": base_url}]
    return merged


def load_schema(running: Running, path_regex: str | None = None, every_group: bool = False) -> Any:
    """The schemathesis schema of ``GROUP_VERSIONS`` (of every served group-version when ``every_group``),
    limited to the paths ``path_regex`` matches."""
    import schemathesis

    group_versions = served_group_versions(running.url, running.headers) if every_group else GROUP_VERSIONS
    schema = schemathesis.openapi.from_dict(merged_document(running.url, running.headers, group_versions))
    return schema.include(path_regex=path_regex) if path_regex else schema


# ---------------------------------------------------------------------------------------------- seeds


def seed_objects() -> dict[str, tuple[str, dict[str, Any]]]:
    """plural -> (collection URL path, a valid object named ``TARGET``)."""
    meta = {"name": TARGET}
    return {
        "configmaps": (f"/api/v1/namespaces/{NS}/configmaps", {"metadata": meta, "data": {"k": "v"}}),
        "pods": (f"/api/v1/namespaces/{NS}/pods", {"metadata": meta, "spec": {"containers": [
            {"name": "main", "image": "loco"}]}}),
        "namespaces": ("/api/v1/namespaces", {"metadata": meta}),
        "trainingjobs": (f"/apis/loco.dev/v1alpha1/namespaces/{NS}/trainingjobs",
                         {"apiVersion": "loco.dev/v1alpha1", "kind": "TrainingJob", "metadata": meta,
                          "spec": {"replicas": 1}}),
    }


def ensure_target(session: requests.Session, running: Running, plural: str) -> None:
    """(Re-)create the object ``TARGET`` of kind ``plural`` (a fuzz case may have deleted or changed it)."""
    seeds = seed_objects()
    if plural not in seeds:
        return
    collection, body = seeds[plural]
    session.post(running.url + collection, json=body, headers=running.headers, timeout=10)


# ---------------------------------------------------------------------------------------------- fuzzing


@dataclasses.dataclass
class Finding:
    operation: str
    what: str  # "500 ..." or "timeout ..."
    request: str

    def line(self) -> str:
        return f"{self.operation}: {self.what} <- {self.request}"


@dataclasses.dataclass
class Report:
    cases: int = 0
    seconds: float = 0.0
    operations: int = 0
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    findings: list[Finding] = dataclasses.field(default_factory=list)
    slowest_s: float = 0.0
    named: int = 0  # cases given a valid metadata.name


def _describe(case: Any) -> str:
    body = case.body if not isinstance(case.body, (bytes, str)) else case.body[:200]
    text = json.dumps({"method": case.method, "path": case.formatted_path, "query": case.query,
                       "media_type": case.media_type, "body": body}, default=repr)
    return text if len(text) < 600 else text[:600] + "..."


def _sender(running: Running, session: requests.Session, report: Report, label: str, plural: str,
            fixed: dict[str, str], request_timeout_s: float) -> Any:
    """The body of one operation's hypothesis test: send the case, count it, record a 5xx or a hang."""

    def send(case: Any) -> None:
        if fixed.get("name") == TARGET:
            ensure_target(session, running, plural)
        if fixed and case.method in ("POST", "PUT") and isinstance(case.body, dict) and \
                isinstance(case.body.get("metadata", {}), dict):
            # a valid name, so the generated content reaches validation and storage (a random name rarely is one)
            report.named += 1
            case.body = {**case.body, "metadata": {**case.body.get("metadata", {}),
                                                   "name": fixed.get("name") or f"fz-{report.named}"}}
        # a generated credential would end the case at the door (401): the token gets every case inside
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"} | running.headers
        t0 = time.monotonic()
        try:
            response = case.call(base_url=running.url, session=session, headers=running.headers,
                                 timeout=request_timeout_s)
        except requests.Timeout:
            report.findings.append(Finding(label, f"no answer in {request_timeout_s} s",
                                           _describe(case)))
            return
        finally:
            report.cases += 1
            report.slowest_s = max(report.slowest_s, time.monotonic() - t0)
        report.statuses[response.status_code] += 1
        if response.status_code >= 500:
            report.findings.append(Finding(label, f"{response.status_code} "
                                           f"{response.text[:300]}", _describe(case)))

    return send


def fuzz(running: Running, schema: Any, examples: int, *, request_timeout_s: float = 5.0,
         seed: int | None = None, negative: bool = True) -> Report:
    """``examples`` cases per operation and generation mode (valid, then invalid when ``negative``);
    derandomized (the same cases every run) unless ``seed`` picks a different stream."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode

    report = Report()
    session = requests.Session()
    started = time.monotonic()
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if negative else [])
    for result in schema.get_all_operations():
        operation = result.ok()
        report.operations += 1
        plural = re.sub(r"/\{name\}$", "", operation.path).rsplit("/", 1)[-1]
        one_object = operation.path.endswith("{name}")
        for mode in modes:
            variants: list[dict[str, str]] = [{}]
            if one_object:
                variants = [{}, {"name": TARGET} | ({"namespace": NS} if "{namespace}" in operation.path else {})]
            elif "{namespace}" in operation.path:
                variants = [{}, {"namespace": NS}]
            for fixed in variants:
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed or None)

                send = _sender(running, session, report, operation.label, plural, fixed, request_timeout_s)
                test = given(case=strategy)(send)
                test = settings(max_examples=examples, derandomize=seed is None, database=None, deadline=None,
                                phases=[Phase.explicit, Phase.generate],
                                suppress_health_check=list(HealthCheck))(test)
                if seed is not None:
                    test = hypothesis_seed(seed)(test)
                test()
    report.seconds = time.monotonic() - started
    return report


# ---------------------------------------------------------------------------------------------- doc


def render(result: dict[str, Any]) -> str:
    from benchdoc import markers

    start, end = markers(DOC_NAME)
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(result["statuses"].items()))
    lines = [
        start,
        "## API server fuzzing (schemathesis)",
        "",
        f"`{result['command']}` on {result['machine']}, {result['date']}, schemathesis {result['schemathesis']}.",
        "",
        "Every operation of every OpenAPI v3 document the embedded API server serves (`/openapi/v3/api/v1`, "
        "`/openapi/v3/apis/apps/v1`, ..., `/openapi/v3/apis/loco.dev/v1alpha1` with the TrainingJob CRD "
        "registered): valid then invalid requests, "
        "half of the one-object ones on configmaps, pods, namespaces and trainingjobs aimed at an object that "
        "exists. A failure is a 5xx answer or no answer in "
        f"{result['request_timeout_s']:g} s. The CI pass (`tests/test_fuzz_apiserver.py`) is a derandomized "
        "subset: configmaps, pods, namespaces and trainingjobs.",
        "",
        "| operations | cases | failures | seconds | slowest answer (s) |",
        "|---|---|---|---|---|",
        f"| {result['operations']} | {result['cases']} | {len(result['findings'])} | {result['seconds']:.0f} | "
        f"{result['slowest_s']:.2f} |",
        "",
        f"Answers by status: {statuses}.",
    ]
    if result["findings"]:
        lines += ["", "Failures:", ""] + [f"- `{f}`" for f in result["findings"][:20]]
    if result.get("fixed"):
        lines += ["", "Found by this fuzzing and fixed: " + result["fixed"]]
    lines.append(end)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60, help="cases per operation, path variant and mode")
    parser.add_argument("--seed", type=int, default=None, help="a random stream instead of the derandomized one")
    parser.add_argument("--request-timeout", type=float, default=5.0, help="seconds before a request counts as a hang")
    parser.add_argument("--no-doc", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import schemathesis

    from benchdoc import cpu_model, write_section

    with running_server() as running:
        report = fuzz(running, load_schema(running, every_group=True), args.examples,
                      request_timeout_s=args.request_timeout, seed=args.seed)
    command = "python bench/fuzz_apiserver.py" + "".join(
        f" {flag} {value}" for flag, value in (("--examples", args.examples), ("--seed", args.seed)) if value is not None)
    result = {
        "command": command, "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"), "schemathesis": schemathesis.__version__,
        "request_timeout_s": args.request_timeout, "operations": report.operations, "cases": report.cases,
        "seconds": report.seconds, "slowest_s": report.slowest_s, "statuses": dict(report.statuses),
        "findings": [f.line() for f in report.findings],
        "fixed": FIXED,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "findings"}, indent=1))
    for line in result["findings"]:
        print("FAIL", line)
    if not args.no_doc:
        from benchdoc import markers

        write_section(render(result), *markers(DOC_NAME))


#: What this fuzzing found in the embedded API server, fixed with a regression test in tests/test_fuzz_apiserver.py.
FIXED = ("a 500 (`'float' object is not subscriptable`) for `metadata.generateName` of the wrong type, and metadata "
         "of other wrong types stored (now a 400, as kube-apiserver's decoder: operations.py); `NaN`/`Infinity` in a "
         "body stored and served back as non-JSON (now a 400 naming the field: operations.py); the documents "
         "declared no path parameters and no request bodies, so they were not valid OpenAPI (openapi.py).")


if __name__ == "__main__":
    main()

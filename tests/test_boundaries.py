"""The architecture's import boundaries, checked in fresh interpreters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print('\\n'.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout.split()
    return {m.split(".")[0] for m in out}


@pytest.mark.parametrize(
    ("code", "forbidden"),
    [
        ("import loco_operator.spec, loco_operator.crd", {"torch"}),
        ("import loco_contract.config, loco_contract.protocol, loco_contract.detection",
         {"torch", "kopf", "kubernetes", "loco_trainer", "loco_operator", "loco_local"}),
        ("import loco_operator.handlers, loco_operator.planner", {"torch", "loco_trainer"}),
        ("import loco_detector, loco_detector.live, loco_detector.cli",
         {"torch", "kopf", "kubernetes", "loco_trainer", "loco_operator", "loco_local"}),
        ("import loco_cli", {"torch", "kopf", "kubernetes", "loco_operator", "loco_local"}),
    ],
)
def test_light_modules_do_not_pull_heavy_dependencies(code: str, forbidden: set[str]) -> None:
    assert not (_imported_modules(code) & forbidden)


def _static_imports(package_dir: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in package_dir.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_operator_never_imports_torch() -> None:
    imports = _static_imports(REPO / "operator" / "loco_operator")
    assert "torch" not in imports, imports.get("torch")


def test_trainer_never_imports_kopf_or_kubernetes() -> None:
    imports = _static_imports(REPO / "trainer_image" / "loco_trainer")
    assert not ({"kopf", "kubernetes"} & set(imports)), {k: imports[k] for k in ("kopf", "kubernetes") if k in imports}


def test_local_cluster_never_imports_torch() -> None:
    imports = _static_imports(REPO / "local" / "loco_local")
    assert "torch" not in imports, imports.get("torch")


def test_no_top_level_package_named_operator() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()


def test_operator_never_imports_the_trainer() -> None:
    """The operator and the trainer meet only in loco_contract (docs/architecture.md)."""
    imports = _static_imports(REPO / "operator" / "loco_operator")
    assert "loco_trainer" not in imports, imports.get("loco_trainer")


def test_trainer_never_imports_the_operator_or_the_local_cluster() -> None:
    imports = _static_imports(REPO / "trainer_image" / "loco_trainer")
    assert not ({"loco_operator", "loco_local"} & set(imports)), {k: imports[k] for k in ("loco_operator", "loco_local")
                                                                 if k in imports}


def test_the_contract_imports_only_itself_pydantic_and_the_standard_library() -> None:
    imports = _static_imports(REPO / "contract" / "loco_contract")
    allowed = {"loco_contract", "pydantic", "__future__", *sys.stdlib_module_names}
    assert set(imports) <= allowed, {k: imports[k] for k in set(imports) - allowed}


PACKAGES = {"loco_contract": "contract", "loco_detector": "detector", "loco_operator": "operator",
            "loco_trainer": "trainer_image", "loco_local": "local"}


def _module_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (at the top or inside a function: a lazy import
    hides a cycle from Python, not from the reader)."""
    root = REPO / PACKAGES[package]
    paths = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                module = node.module or ""
                if node.level:
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([module] if module else []))
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in paths else module for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in paths and t != name}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles_inside_a_package(package: str) -> None:
    """launcher <-> train and ucp.engine <-> ucp.verify imported each other (issue 23): none may again."""
    assert _cycles(_module_graph(package)) == []


def test_the_detector_is_a_library_of_the_contract_and_numpy() -> None:
    """The operator and the local launcher both run it, so it may import neither (nor torch, kopf, kubernetes)."""
    imports = _static_imports(REPO / "detector" / "loco_detector")
    allowed = {"loco_detector", "loco_contract", "numpy", "pydantic", "click", "yaml", "__future__",
               *sys.stdlib_module_names}
    assert set(imports) <= allowed, {k: imports[k] for k in set(imports) - allowed}


def _base_install_distributions() -> set[str]:
    """The distributions `pip install loco` (no extra) brings: the base dependencies and theirs, transitively."""
    import importlib.metadata as md
    import re
    import tomllib

    def name(requirement: str) -> str:
        return re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    todo = [name(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        for requirement in md.distribution(dist).requires or []:
            if "extra ==" not in requirement:  # an optional dependency of that distribution
                todo.append(name(requirement))
    return seen


def test_loco_diagnose_runs_with_the_base_install_alone(tmp_path) -> None:
    """Issue 24 #7: `loco diagnose` on a trace imports nothing the base install lacks (numpy is a base dependency)."""
    import importlib.metadata as md

    trace = tmp_path / "trace.jsonl"
    code = (
        "from loco_detector.trace import write_trace\n"
        "from loco_detector.types import RankHeartbeat\n"
        f"write_trace({str(trace)!r}, {{0: 'n0', 1: 'n1'}}, [], [], [RankHeartbeat(rank=0, last_report_s=1.0)], end_s=2.0)\n"
        "import contextlib, io, loco_cli\n"
        "try:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        f"        loco_cli.main(['diagnose', {str(trace)!r}])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
    )
    # private and interpreter-made modules (C-extension internals, the editable install's finder) belong to no one
    modules = {m for m in _imported_modules(code) - set(sys.stdlib_module_names)
               if not m.startswith("_") and m != "cython_runtime"}
    owners = md.packages_distributions()
    base = _base_install_distributions()
    ours = {m for m in modules if m.startswith("loco_") or m == "loco_cli"}
    missing = {m: owners.get(m) for m in modules - ours
               if not {d.lower().replace("_", "-") for d in owners.get(m, [m])} & base}
    assert not missing, f"loco diagnose imports modules the base install does not bring: {missing}"
    assert "numpy" in modules  # it did run the detector

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
        ("import loco_trainer.config, loco_trainer.protocol", {"torch", "kopf", "kubernetes"}),
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

"""Shared by every benchmark: write its own section of docs/benchmarks.md and nothing else.

Each benchmark owns the lines between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; a run
replaces them (or appends the section when the markers are missing), so benchmarks can be re-run in
any order without touching each other's figures.
"""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of benchmark ``name``'s section."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(section: str, start: str, end: str, path: Path | str = DOC) -> None:
    """Put ``section`` between ``start`` and ``end`` in ``path`` (the markers are added to
    ``section`` when it does not carry them), replacing what stood there before."""
    path = Path(path)
    body = section.strip("\n")
    if not body.startswith(start):
        body = f"{start}\n{body}"
    if not body.endswith(end):
        body = f"{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text.rstrip("\n") + "\n")


def parse_algorithms(text: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated ``--algorithms`` value as a list; ``SystemExit`` naming the unknown ones."""
    algorithms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = sorted(set(algorithms) - set(known))
    if unknown:
        raise SystemExit(f"--algorithms: unknown {unknown}; choose from {', '.join(known)}")
    return algorithms


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def run_trainer(config: Path, history: Path, *, nproc: int, env: dict[str, str] | None = None,
                what: str = "") -> None:
    """Run the trainer's real code path (``python -m loco_trainer --config FILE --nproc N --history FILE``, one thread
    per process); RuntimeError with the output's tail when it fails."""
    import os
    import subprocess
    import sys

    history.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "loco_trainer", "--config", str(config), "--nproc", str(nproc),
           "--history", str(history), "--status-port", "-1"]
    result = subprocess.run(cmd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"trainer failed ({result.returncode}) for {what or config.stem}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

"""Every GPU check the project owes, in one command, for a lent ``device`` machine (one GPU).

A device lease is short (minutes) and starts bare, so this runs everything that needs a GPU in one
go, each part under its own time limit, and keeps going when one part fails:

1. **CUDA smoke** of the real training loop (``python -m loco_trainer --nproc 1``, bf16 on the GPU)
   for every algorithm: a run with checkpoints, then a longer run in the same job directory that must
   resume from the last checkpoint (universal checkpoint, CUDA tensors) and finish. One GPU hosts one
   NCCL rank, so these are 1-rank jobs: they exercise the device paths of the strategies, the comm
   layer and the checkpoint engine, not multi-GPU collectives.
2. ``bench/bench_gpu.py`` (trainer vs bare loop, comm-layer overhead),
   ``bench/bench_trainer.py --gpu`` (tokens/s and MFU) and ``bench/bench_checkpoint.py --device cuda``:
   they write their figures into ``bench/results/`` and ``docs/benchmarks.md`` themselves.

A summary goes to stdout and, as JSON, to ``$OUT/gpu_checks.json`` when ``OUT`` is set; with ``OUT``
set the benchmarks' result files, ``docs/benchmarks.md`` and each benchmark's whole output (``<bench>.log``:
``bench_checkpoint``'s CUDA section is only there, its doc section keeps the CPU figures) are copied there
too, to be committed from the development machine. ``bench/gpu_checks.sh`` is the wrapper to hand the device (it installs the
carried wheels first); ``--device cpu --skip-benches`` runs part 1 here, to check the script itself.

    python bench/gpu_checks.py                          # on the GPU machine
    python bench/gpu_checks.py --device cpu --skip-benches
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ("ddp", "diloco", "streaming-diloco", "noloco", "co2")

#: per-algorithm settings that fit a 30-step smoke run (H small enough for several outer steps)
SMOKE_ALGORITHM = {
    "ddp": {"name": "ddp"},
    "diloco": {"name": "diloco", "syncEvery": 5},
    "streaming-diloco": {"name": "streaming-diloco", "syncEvery": 8, "fragments": 2, "overlapSteps": 1},
    "noloco": {"name": "noloco", "syncEvery": 5},
    "co2": {"name": "co2", "syncEvery": 5},
}

#: (command, time limit in seconds): the benchmarks, in the order they run
BENCHES = (
    (["bench/bench_gpu.py"], 240),
    (["bench/bench_trainer.py", "--gpu"], 150),
    # --no-write: its doc section holds the CPU figures; the CUDA section comes back in its log
    (["bench/bench_checkpoint.py", "--device", "cuda", "--no-write"], 200),
)

#: what comes back from the device (at most 8 files, with gpu_checks.json and one log per benchmark):
#: the benchmarks' results and the doc they render
RESULT_FILES = ("bench/results/bench_gpu.json", "bench/results/bench_trainer.json", "docs/benchmarks.md")


def smoke_config(algorithm: str, device: str, steps: int, ckpt: Path) -> dict[str, Any]:
    return {
        "jobName": f"gpu-smoke-{algorithm}",
        "model": {"gpt": {"nLayer": 2, "nHead": 4, "nEmbd": 128, "blockSize": 128}},
        "data": {"maxBytes": 2_000_000},
        "training": {"steps": steps, "batchSize": 8, "seqLen": 128, "logEvery": 5, "evalEvery": 10, "evalBatches": 2,
                     "dtype": "bfloat16" if device == "cuda" else "float32", "device": device},
        "algorithm": SMOKE_ALGORITHM[algorithm],
        "checkpoint": {"everySteps": 10, "path": str(ckpt)},
    }


def run_trainer(config: dict[str, Any], workdir: Path, name: str, timeout_s: float) -> dict[str, Any]:
    """One 1-rank trainer run; returns its exit code, wall time, history records and output tail."""
    cfg, history = workdir / f"{name}.json", workdir / f"{name}.jsonl"
    cfg.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "loco_trainer", "--config", str(cfg), "--nproc", "1", "--history", str(history),
           "--status-port", "-1"]
    code, out, wall = run_command(cmd, timeout_s)
    records = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
    return {"code": code, "wall_s": wall, "records": records, "tail": out[-3000:]}


def run_command(cmd: list[str], timeout_s: float) -> tuple[int | str, str, float]:
    """``cmd`` from the repository root: (exit code or "timeout", stdout + stderr, wall seconds)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        code: int | str = proc.returncode
        parts = [proc.stdout, proc.stderr]
    except subprocess.TimeoutExpired as exc:  # its output can be bytes even with text=True
        code, parts = "timeout", [exc.stdout, exc.stderr]
    out = "".join(p.decode(errors="replace") if isinstance(p, bytes) else (p or "") for p in parts)
    return code, out, round(time.perf_counter() - start, 1)


def smoke(algorithm: str, device: str, workdir: Path, steps: int = 30, more: int = 10) -> dict[str, Any]:
    """Train ``steps`` steps with a checkpoint every 10, then ``steps + more`` in the same job directory:
    the second run must resume at ``steps`` and end with a finite eval loss."""
    ckpt = workdir / f"ckpt-{algorithm}"
    first = run_trainer(smoke_config(algorithm, device, steps, ckpt), workdir, f"{algorithm}-1", 120)
    result: dict[str, Any] = {"algorithm": algorithm, "device": device, "first_wall_s": first["wall_s"]}
    if first["code"] != 0:
        return {**result, "ok": False, "why": f"first run exited {first['code']}", "tail": first["tail"]}
    second = run_trainer(smoke_config(algorithm, device, steps + more, ckpt), workdir, f"{algorithm}-2", 120)
    result["second_wall_s"] = second["wall_s"]
    if second["code"] != 0:
        return {**result, "ok": False, "why": f"resumed run exited {second['code']}", "tail": second["tail"]}
    stepped = [r["step"] for r in second["records"] if "wallS" in r]
    final = next((r for r in second["records"] if r.get("final")), None)
    if not stepped or stepped[0] != steps + 1:
        return {**result, "ok": False, "why": f"resumed run did not start at step {steps + 1} (steps {stepped[:3]})",
                "tail": second["tail"]}
    if final is None or not math.isfinite(final["evalLoss"]):
        return {**result, "ok": False, "why": f"no finite final eval loss ({final})", "tail": second["tail"]}
    first_final = next((r for r in first["records"] if r.get("final")), {})
    return {**result, "ok": True, "eval_loss_at_%d" % steps: first_final.get("evalLoss"),
            "eval_loss_at_%d" % (steps + more): final["evalLoss"]}


def run_bench(args: list[str], timeout_s: int) -> dict[str, Any]:
    code, out, wall = run_command([sys.executable, *args], timeout_s)
    return {"command": "python " + " ".join(args), "code": code, "wall_s": wall, "tail": out[-2500:], "output": out}


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when a GPU is visible) or cpu")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="smoke only these (comma-separated)")
    parser.add_argument("--skip-smoke", action="store_true", help="only the benchmarks")
    parser.add_argument("--skip-benches", action="store_true", help="only the smoke runs")
    parser.add_argument("--budget-s", type=float, default=560,
                        help="end within this many seconds (a device command may run 600): a benchmark gets what is "
                             "left, up to its own limit, and is skipped with under 30 s left")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s

    info = machine()
    device = args.device or ("cuda" if info["cuda"] else "cpu")
    if device == "cuda" and not info["cuda"]:
        parser.error("--device cuda: torch sees no GPU here (torch %s); use --device cpu to check the script" % info["torch"])
    print(f"gpu_checks: {info}", flush=True)
    summary: dict[str, Any] = {"machine": info, "device": device, "date": time.strftime("%Y-%m-%d"), "smoke": [],
                               "benches": []}
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        parser.error(f"--algorithms: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")

    if not args.skip_smoke:
        with tempfile.TemporaryDirectory(prefix="loco-gpu-smoke-") as tmp:
            for algorithm in algorithms:
                row = smoke(algorithm, device, Path(tmp))
                summary["smoke"].append(row)
                verdict = "ok" if row["ok"] else "FAILED: " + row["why"]
                print(f"smoke {algorithm:17s} {verdict} ({row.get('first_wall_s')} s + {row.get('second_wall_s', '-')} s)",
                      flush=True)
                if not row["ok"]:
                    print(row["tail"], flush=True)
    if not args.skip_benches:
        if device != "cuda":
            parser.error("the benchmarks need a GPU: add --skip-benches to run the smoke part on the CPU")
        for bench_args, limit in BENCHES:
            left = deadline - time.monotonic() - 5
            if left < 30:
                row = {"command": "python " + " ".join(bench_args), "code": "skipped: budget spent", "wall_s": 0, "tail": ""}
                summary["benches"].append(row)
                print(f"{row['command']}: {row['code']}", flush=True)
                continue
            row = run_bench(bench_args, int(min(limit, left)))
            summary["benches"].append(row)
            print(f"{row['command']}: exit {row['code']} after {row['wall_s']} s", flush=True)
            print(row["tail"][-1500:], flush=True)

    out = os.environ.get("OUT")
    if out:
        for row in summary["benches"]:  # the whole output of each benchmark, e.g. bench_checkpoint's CUDA section
            Path(out, Path(row["command"].split()[1]).stem + ".log").write_text(row.pop("output", ""))
        Path(out, "gpu_checks.json").write_text(json.dumps(summary, indent=1))
        for rel in RESULT_FILES:
            if (ROOT / rel).exists():
                shutil.copy(ROOT / rel, Path(out, Path(rel).name))
    failed = [r["algorithm"] for r in summary["smoke"] if not r["ok"]] + \
             [r["command"] for r in summary["benches"] if r["code"] != 0]
    print("gpu_checks: " + ("all passed" if not failed else "FAILED: " + ", ".join(failed)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

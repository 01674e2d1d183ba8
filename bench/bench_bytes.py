"""Streaming DiLoCo's exchange by replicas: the bytes a rank sends per inner step at 2, 4 and 8 replicas, for each
wire format, measured through the trainer's counting comm layer (``python -m loco_trainer --nproc N --history F``).

With 3 or more replicas a quantised exchange goes as a reduce-scatter then an all-gather (docs/algorithms.md), so
what a rank sends stays about 2(n−1)/n of the encoded model; the table sets it beside the all-gather it replaced
((n−1) encoded copies, the formula) and DiLoCo's fp32 ring all-reduce. Written into docs/benchmarks.md.

    python bench/bench_bytes.py                # replicas 2, 4, 8; none, bf16, e3m0 (~3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from benchdoc import cpu_model, markers, write_section  # noqa: E402

START, END = markers("bench_bytes")
H, FRAGMENTS, STEPS = 10, 2, 40
#: the convergence benchmark's model (bench_convergence.BASE_CONFIG)
MODEL = {"gpt": {"nLayer": 2, "nHead": 2, "nEmbd": 32, "blockSize": 32}}


def config(quantization: str, ckpt: str) -> dict[str, Any]:
    return {"jobName": "bench-bytes", "model": MODEL, "data": {"maxBytes": 200_000},
            "training": {"steps": STEPS, "batchSize": 2, "seqLen": 32, "lr": 3e-3, "warmupSteps": 2, "logEvery": 1000,
                         "evalEvery": 0, "evalBatches": 1},
            "algorithm": {"name": "streaming-diloco", "syncEvery": H, "fragments": FRAGMENTS, "overlapSteps": 1,
                          "quantization": quantization},
            "checkpoint": {"path": ckpt, "everySteps": 0}}


def bytes_per_step(history: list[dict[str, Any]]) -> float:
    """Bytes rank 0 sent per inner step between the first and the last full period (the one-time broadcast of the
    initial weights and the final exchange left out)."""
    by_step = {rec["step"]: rec["bytesSent"] for rec in history if not rec.get("final") and "bytesSent" in rec}
    return (by_step[STEPS] - by_step[H]) / (STEPS - H)


def run(replicas: int, quantization: str, workdir: Path) -> float:
    name = f"{quantization}-{replicas}"
    cfg, history = workdir / f"{name}.json", workdir / f"{name}.jsonl"
    cfg.write_text(json.dumps(config(quantization, str(workdir / f"ckpt-{name}"))))
    result = subprocess.run([sys.executable, "-m", "loco_trainer", "--config", str(cfg), "--nproc", str(replicas),
                             "--history", str(history), "--status-port", "-1"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return bytes_per_step([json.loads(line) for line in history.read_text().splitlines() if line.strip()])


def num_params_and_tensors() -> tuple[int, int]:
    import torch

    from loco_contract.config import GPTSpec
    from loco_trainer.model import GPT

    with torch.device("meta"):
        model = GPT(GPTSpec.model_validate(MODEL["gpt"]))
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), len(params)


def render(rows: list[dict[str, Any]], n_params: int, command: str) -> str:
    lines = [
        "## Streaming DiLoCo's 4-bit exchange by replicas (`bench/bench_bytes.py`)",
        "",
        f"Bytes rank 0 sent per inner step (H = {H}, P = {FRAGMENTS}, τ = 1; the convergence benchmark's model, "
        f"N = {n_params:,} trainable parameters), measured by the counting comm layer between steps {H} and {STEPS}. "
        "*all-gather (formula)* is what the previous exchange sent: n−1 encoded copies per rank. *DiLoCo fp32* is a "
        "ring all-reduce of the fp32 model, 2(n−1)/n · 4N / H.",
        "",
        "| replicas | wire | measured bytes/step | vs DiLoCo fp32 | all-gather (formula) | exchange |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['replicas']} | {r['quantization']} | {r['measured']:,.0f} | {r['vs_fp32']:.3f} | "
                     f"{'-' if r['allgather'] is None else format(r['allgather'], ',.0f')} | {r['exchange']} |")
    lines += ["", f"Machine: {cpu_model()}, {os.cpu_count()} cores; {date.today().isoformat()}; command `{command}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="2,4,8")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    n_params, tensors = num_params_and_tensors()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-bytes-") as tmp:
        for n in (int(x) for x in args.replicas.split(",")):
            for q in ("none", "bf16", "e3m0"):
                measured = run(n, q, Path(tmp))
                fp32 = 2 * (n - 1) / n * 4 * n_params / H
                allgather = None if q == "none" else (n - 1) * (2 * n_params if q == "bf16" else n_params / 2 + 4 * tensors) / H
                exchange = ("all-reduce" if q == "none" else "all-gather" if n == 2 else "reduce-scatter + all-gather")
                rows.append({"replicas": n, "quantization": q, "measured": measured, "vs_fp32": measured / fp32,
                             "allgather": allgather, "exchange": exchange})
                print(f"replicas {n} {q}: {measured:,.0f} bytes/step ({measured / fp32:.3f} of fp32)", flush=True)
    command = "python bench/bench_bytes.py" + (f" --replicas {args.replicas}" if args.replicas != "2,4,8" else "")
    text = render(rows, n_params, command)
    print(text)
    if not args.no_doc:
        write_section(text, START, END)


if __name__ == "__main__":
    main()

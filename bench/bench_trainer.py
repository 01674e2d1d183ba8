"""Trainer throughput benchmark: steps/s and tokens/s of the real training loop.

CPU mode (default): the tiny GPT at 1 and 3 ranks with DDP, through ``python -m loco_trainer
--nproc N`` exactly as users run it. GPU mode (``--gpu``): a >=100 M-parameter GPT in bf16 on one
process; reports tokens/s and MFU against the H100's dense bf16 peak (989 TFLOP/s).

Timing comes from the trainer's own per-step history (``--history``): the first ``--warmup``
steps are skipped, steps/s is measured over the rest. Results are kept in
``bench/results/bench_trainer.json`` (one entry per mode, so CPU and GPU runs on different
machines combine) and rendered into the trainer section of ``docs/benchmarks.md``, replacing
the previous one.

    python bench/bench_trainer.py            # CPU rows
    python bench/bench_trainer.py --gpu      # GPU row (on a CUDA machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_trainer.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench_trainer:start -->", "<!-- bench_trainer:end -->"
H100_BF16_PEAK_FLOPS = 989e12

CPU_CONFIG = {
    "jobName": "bench-trainer",
    "model": {"gpt": {"nLayer": 2, "nHead": 2, "nEmbd": 64, "blockSize": 64}},
    "data": {"maxBytes": 2_000_000},
    "training": {"steps": 110, "batchSize": 8, "seqLen": 64, "logEvery": 20, "evalEvery": 0, "evalBatches": 1},
    "algorithm": {"name": "ddp"},
    "checkpoint": {"everySteps": 0},
}

GPU_CONFIG = {
    "jobName": "bench-trainer-gpu",
    # 12 x 12 x 1024^2 ~ 151 M parameters (byte-level vocabulary, so nearly all are in the blocks)
    "model": {"gpt": {"nLayer": 12, "nHead": 16, "nEmbd": 1024, "blockSize": 1024}},
    "data": {"maxBytes": 50_000_000},
    "training": {"steps": 40, "batchSize": 16, "seqLen": 1024, "logEvery": 10, "evalEvery": 0, "evalBatches": 1,
                 "dtype": "bfloat16", "device": "cuda"},
    "algorithm": {"name": "ddp"},
    "checkpoint": {"everySteps": 0},
}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_1min": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_trainer(config: dict, nproc: int, workdir: Path, warmup: int) -> dict:
    """One trainer run; returns steps/s and tokens/s measured after ``warmup`` steps."""
    config = json.loads(json.dumps(config))
    config["checkpoint"]["path"] = str(workdir / f"ckpt-{nproc}")
    cfg_path, history = workdir / f"config-{nproc}.json", workdir / f"history-{nproc}.jsonl"
    cfg_path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "loco_trainer", "--config", str(cfg_path), "--nproc", str(nproc),
           "--history", str(history), "--status-port", "-1"]
    start = time.perf_counter()
    # One intra-op thread per rank in every row, so the rows compare (a tiny model gains nothing
    # from more, and spinning threads collapse on a loaded machine).
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"trainer failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    records = [r for r in map(json.loads, history.read_text().splitlines()) if "wallS" in r]
    t0 = next(r["wallS"] for r in records if r["step"] == warmup)
    t1 = records[-1]["wallS"]
    steps = records[-1]["step"] - warmup
    tr = config["training"]
    tokens_per_step = tr["batchSize"] * nproc * tr["seqLen"]
    steps_per_s = steps / (t1 - t0)
    return {"nproc": nproc, "steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * tokens_per_step,
            "tokens_per_step": tokens_per_step, "measured_steps": steps, "wall_s": wall,
            "final_loss": records[-1]["loss"]}


def gpu_flops_per_token(config: dict) -> tuple[float, int]:
    """(training FLOPs per token, parameter count) of the config's GPT, built on the meta device."""
    from loco_contract.config import GPTSpec
    from loco_trainer.model import GPT

    import torch

    with torch.device("meta"):
        model = GPT(GPTSpec.model_validate(config["model"]["gpt"]))
    return model.flops_per_token(config["training"]["seqLen"]), model.num_params()


def render(results: dict) -> str:
    lines = [START, "## Trainer throughput (`bench/bench_trainer.py`)", ""]
    cpu = results.get("cpu")
    if cpu:
        m, c = cpu["machine"], cpu["config"]
        g = c["model"]["gpt"]
        lines += [
            f"Tiny GPT (nLayer {g['nLayer']}, nEmbd {g['nEmbd']}, {cpu['params']:,} parameters), seqLen "
            f"{c['training']['seqLen']}, batchSize {c['training']['batchSize']} per rank, DDP over gloo, one thread per rank, "
            f"measured after {cpu['warmup']} warm-up steps of the real loop (`python -m loco_trainer --nproc N`).",
            "",
            "| ranks | steps/s | tokens/s (all ranks) | tokens/step |",
            "|---:|---:|---:|---:|",
        ]
        for row in cpu["rows"]:
            lines.append(f"| {row['nproc']} | {row['steps_per_s']:.1f} | {row['tokens_per_s']:,.0f} | {row['tokens_per_step']:,} |")
        if any(row["nproc"] > m["cores"] for row in cpu["rows"]):
            lines += ["", f"Ranks above {m['cores']} share the cores (oversubscribed): the multi-rank rows measure "
                          "the loop and gloo overhead, not scaling."]
        lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']} "
                      f"({cpu['date']}; 1-minute load average {m.get('load_1min', '?')} at the start). "
                      f"Command: `{cpu['command']}`.", ""]
    gpu = results.get("gpu")
    lines += ["| GPU run (one process, bf16) | parameters | tokens/s | MFU vs H100 bf16 989 TFLOP/s |", "|---|---:|---:|---:|"]
    if gpu:
        lines.append(f"| {gpu['machine'].get('gpu', '?')}, torch {gpu['machine']['torch']} ({gpu['date']}) | "
                     f"{gpu['params'] / 1e6:.0f} M | {gpu['tokens_per_s']:,.0f} | {100 * gpu['mfu']:.1f} % |")
        lines += ["", f"GPU command: `{gpu['command']}`."]
    else:
        lines.append("| owed: no GPU machine has run `python bench/bench_trainer.py --gpu` yet | - | - | - |")
    lines += ["", END]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    from benchdoc import write_section  # bench/ is on sys.path when run as a script

    write_section(section, START, END, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="GPU mode: >=100 M-parameter GPT, bf16, one process")
    parser.add_argument("--ranks", default="1,3", help="CPU mode: comma-separated rank counts (default 1,3)")
    parser.add_argument("--steps", type=int, default=None, help="override training.steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from the timing")
    parser.add_argument("--no-doc", action="store_true", help="print results only; do not touch docs/benchmarks.md")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    command = "python bench/bench_trainer.py " + " ".join(sys.argv[1:])
    date = time.strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        if args.gpu:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("--gpu needs a CUDA device; none is visible")
            config = json.loads(json.dumps(GPU_CONFIG))
            if args.steps:
                config["training"]["steps"] = args.steps
            row = run_trainer(config, 1, Path(tmp), args.warmup)
            flops, params = gpu_flops_per_token(config)
            entry = {**row, "params": params, "mfu": flops * row["tokens_per_s"] / H100_BF16_PEAK_FLOPS,
                     "machine": machine(), "date": date, "command": command.strip(), "config": config}
            results["gpu"] = entry
            print(json.dumps({k: v for k, v in entry.items() if k != "config"}, indent=2))
        else:
            config = json.loads(json.dumps(CPU_CONFIG))
            if args.steps:
                config["training"]["steps"] = args.steps
            rows = [run_trainer(config, int(n), Path(tmp), args.warmup) for n in args.ranks.split(",")]
            _, params = gpu_flops_per_token(config)
            results["cpu"] = {"rows": rows, "params": params, "warmup": args.warmup, "machine": machine(),
                              "date": date, "command": command.strip(), "config": config}
            for row in rows:
                print(f"{row['nproc']} rank(s): {row['steps_per_s']:.1f} steps/s, {row['tokens_per_s']:,.0f} tokens/s")
    if not args.no_doc:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        write_doc(render(results))
        print(f"updated {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

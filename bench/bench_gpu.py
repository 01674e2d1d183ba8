"""GPU benchmark: the trainer against a bare PyTorch loop, and the cost of the comm-counting layer.

Needs one CUDA GPU (written for the H100; MFU is against its dense bf16 peak, 989 TFLOP/s).

1. **Trainer vs bare loop.** The trainer runs exactly as users run it, ``python -m loco_trainer
   --nproc 1`` with DDP in bf16 autocast on ``bench_trainer.GPU_CONFIG`` (a ~150 M-parameter GPT,
   batch 16 x 1024 tokens); tokens/s comes from its own per-step history after ``--warmup`` steps.
   The bare loop is the same model (``loco_trainer.model.GPT`` of the same spec, same seed), the same
   batches (the same built-in corpus windows, staged on the GPU before timing, so the bare loop pays
   no data loading at all), the same AdamW, lr schedule, bf16 autocast and gradient clipping, with no
   per-step host sync (the trainer reads the loss every step). Goal: trainer >= 0.97x bare.
2. **Comm-layer overhead.** One GPU cannot host a 2-rank NCCL group, and a 1-rank
   :class:`~loco_trainer.comm.Comm` issues no collective (by contract), so the layer is measured in
   place: a 1-rank NCCL group, the same training step as (1), then the gradients all-reduced in
   25 MiB buckets (DDP's default) either with raw ``torch.distributed.all_reduce`` (A) or through
   ``Comm.all_reduce`` (B: byte accounting, flight-recorder record, completion handle) on a Comm
   told it has 2 ranks so its bookkeeping runs (``op="sum"`` in both, so B does no extra division).
   A and B alternate in blocks to cancel drift; overhead = (step_B - step_A) / step_A. Goal: < 1 %.

Results go to ``bench/results/bench_gpu.json`` and the ``## GPU`` section of ``docs/benchmarks.md``.

    python bench/bench_gpu.py                 # both parts (a CUDA machine)
    python bench/bench_gpu.py --render-only   # re-render the doc section (rows are "owed" until run)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import GPU_CONFIG, H100_BF16_PEAK_FLOPS, run_trainer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "bench_gpu.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench_gpu:start -->", "<!-- bench_gpu:end -->"
COMMAND = "python bench/bench_gpu.py"
BUCKET_BYTES = 25 << 20


def lr_schedule(tr: dict[str, Any]) -> list[float]:
    """The trainer's lr for every step (its own ``lr_at``), computed before any timing."""
    from loco_contract.config import TrainingSpec
    from loco_trainer.train import lr_at

    spec = TrainingSpec.model_validate(tr)
    return [lr_at(step, spec) for step in range(spec.steps)]


def build(config: dict[str, Any], device: Any) -> tuple[Any, Any, list[tuple[Any, Any]]]:
    """(model, optimizer, staged batches) for the bare loop, mirroring the trainer's construction."""
    import torch

    from loco_contract.config import TrainerConfig
    from loco_trainer.data import Dataset, DataPosition
    from loco_trainer.model import build_model

    cfg = TrainerConfig.model_validate(config)
    tr = cfg.training
    data = Dataset(cfg.data, tr.seq_len, tr.seed)
    torch.manual_seed(tr.seed)
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=(tr.beta1, tr.beta2), weight_decay=tr.weight_decay)
    position, batches = DataPosition(0), []
    for _ in range(tr.steps):
        x, y = data.train_batch(position, tr.batch_size, 0, 1)
        batches.append((x.to(device), y.to(device)))
        position = position.advance(tr.batch_size)
    return model, optimizer, batches


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, x, y, lr: float, grad_clip: float, after_backward=None, bf16: bool = True) -> Any:
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        _, loss = model(x, y)
    loss.backward()
    if after_backward is not None:
        after_backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def bare_loop(config: dict[str, Any], warmup: int, device: str = "cuda") -> dict[str, Any]:
    """tokens/s of the bare loop over the steps after ``warmup``."""
    import torch

    tr, dev = config["training"], torch.device(device)
    model, optimizer, batches = build(config, dev)
    model.train()
    clip, lrs, bf16 = tr.get("gradClip", 1.0), lr_schedule(tr), tr.get("dtype") == "bfloat16"
    for step in range(warmup):
        train_step(model, optimizer, *batches[step], lrs[step], clip, bf16=bf16)
    sync(dev)
    start = time.perf_counter()
    for step in range(warmup, tr["steps"]):
        loss = train_step(model, optimizer, *batches[step], lrs[step], clip, bf16=bf16)
    sync(dev)
    seconds = time.perf_counter() - start
    steps = tr["steps"] - warmup
    tokens = steps * tr["batchSize"] * tr["seqLen"]
    return {"tokens_per_s": tokens / seconds, "steps_per_s": steps / seconds, "measured_steps": steps,
            "final_loss": float(loss.float().item())}


def comm_overhead(config: dict[str, Any], steps_per_block: int, blocks: int, device: str = "cuda") -> dict[str, Any]:
    """Per-step time with gradients all-reduced raw (A) vs through Comm (B); see the module docstring.
    ``device="cpu"`` (gloo) only checks the code path (``--dry-run-cpu``)."""
    import torch
    import torch.distributed as dist

    from loco_trainer.comm import Comm, buckets
    from loco_trainer.rendezvous import free_port

    dev = torch.device(device)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    if dev.type == "cuda":
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        tr = dict(config["training"], steps=steps_per_block * 2 * blocks + steps_per_block)
        cfg = dict(config, training=tr)
        model, optimizer, batches = build(cfg, dev)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        groups = buckets([p.grad for p in params], BUCKET_BYTES)
        comm = Comm()
        comm._world_size = 2  # bench only: make the 1-rank Comm run its accounting (see the docstring)
        flats = [torch.empty(sum(params[i].numel() for i in g), device=dev) for g in groups]

        def reduce(use_comm: bool) -> None:
            handles = []
            for flat, g in zip(flats, groups):
                torch.cat([params[i].grad.reshape(-1) for i in g], out=flat)
                handles.append(comm.all_reduce(flat, op="sum", async_op=True) if use_comm
                               else dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True))
            for h in handles:
                h.wait()
            for flat, g in zip(flats, groups):
                offset = 0
                for i in g:
                    n = params[i].numel()
                    params[i].grad.copy_(flat[offset:offset + n].view_as(params[i].grad))
                    offset += n

        clip, lrs, bf16 = tr.get("gradClip", 1.0), lr_schedule(tr), tr.get("dtype") == "bfloat16"
        step = 0

        def block(use_comm: bool) -> float:
            nonlocal step
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps_per_block):
                train_step(model, optimizer, *batches[step], lrs[step], clip, lambda: reduce(use_comm), bf16)
                step += 1
            sync(dev)
            return (time.perf_counter() - t0) / steps_per_block

        block(False)  # warm-up (NCCL init, allocator)
        raw, counted = [], []
        for _ in range(blocks):
            raw.append(block(False))
            counted.append(block(True))
        a, b = sorted(raw)[len(raw) // 2], sorted(counted)[len(counted) // 2]  # medians
        return {"step_s_raw": a, "step_s_comm": b, "overhead_pct": 100 * (b - a) / a, "buckets": len(groups),
                "calls_counted": comm.stats()["by_kind"]["all_reduce"]["calls"], "blocks": blocks,
                "steps_per_block": steps_per_block}
    finally:
        dist.destroy_process_group()


def machine() -> dict[str, Any]:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def render(results: dict[str, Any]) -> str:
    """The ``## GPU`` section; rows not measured yet say "owed" with the command that measures them."""
    lines = [START, "## GPU: trainer vs bare PyTorch loop, comm-layer overhead (`bench/bench_gpu.py`)", ""]
    r = results.get("run")
    if not r:
        lines += [
            "| measurement | goal | result |", "|---|---|---|",
            f"| trainer (DDP, 1 process, bf16) tokens/s and MFU vs a bare loop of the same model and batch | >= 0.97x | "
            f"**owed**: no GPU has run `{COMMAND}` yet |",
            f"| per-step overhead of the comm-counting layer (`Comm`) | < 1 % | **owed**: `{COMMAND}` |",
            "", "Method: see the module docstring of `bench/bench_gpu.py`. Every GPU check in one device call "
                "(with a CUDA smoke of each algorithm and its checkpoint resume first): `make gpu-wheels` here, then "
                "`bash bench/gpu_checks.sh` on the GPU machine with `.whl` carried.", "", END,
        ]
        return "\n".join(lines)
    t, b, c, m = r["trainer"], r["bare"], r["comm"], r["machine"]
    ratio = t["tokens_per_s"] / b["tokens_per_s"]
    lines += [
        f"{m.get('gpu', '?')}, torch {m['torch']}, {r['params'] / 1e6:.0f} M-parameter GPT, batch "
        f"{r['config']['training']['batchSize']} x {r['config']['training']['seqLen']} tokens, bf16 autocast ({r['date']}).",
        "",
        "| run | tokens/s | MFU (of 989 TFLOP/s) | vs bare |", "|---|---:|---:|---:|",
        f"| bare PyTorch loop (batches staged on the GPU, no per-step sync) | {b['tokens_per_s']:,.0f} | "
        f"{100 * b['mfu']:.1f} % | 1.00x |",
        f"| trainer, `python -m loco_trainer --nproc 1`, DDP | {t['tokens_per_s']:,.0f} | {100 * t['mfu']:.1f} % | "
        f"**{ratio:.3f}x** (goal >= 0.97x) |",
        "",
        f"Comm-counting layer: median step {1000 * c['step_s_raw']:.1f} ms with raw `all_reduce` vs "
        f"{1000 * c['step_s_comm']:.1f} ms through `Comm` ({c['buckets']} buckets per step, {c['blocks']} alternating "
        f"blocks of {c['steps_per_block']} steps): **{c['overhead_pct']:+.2f} %** per step (goal < 1 %).",
        "", f"Command: `{r['command']}`.", "", END,
    ]
    return "\n".join(lines)


def write_doc(section: str, doc: Path = DOC) -> None:
    from benchdoc import write_section  # bench/ is on sys.path when run as a script

    write_section(section, START, END, doc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps of the trainer and the bare loop")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from the timing")
    parser.add_argument("--blocks", type=int, default=5, help="comm overhead: alternating A/B blocks")
    parser.add_argument("--block-steps", type=int, default=10, help="comm overhead: steps per block")
    parser.add_argument("--render-only", action="store_true", help="only re-render the doc section")
    parser.add_argument("--no-doc", action="store_true", help="print the results; do not touch docs/benchmarks.md")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="check the code path on CPU with a tiny GPT (no figures, no doc)")
    args = parser.parse_args(argv)
    if args.dry_run_cpu:
        config = json.loads(json.dumps(GPU_CONFIG))
        config["model"]["gpt"] = {"nLayer": 1, "nHead": 2, "nEmbd": 32, "blockSize": 32}
        config["data"]["maxBytes"] = 200_000
        config["training"].update(steps=8, batchSize=2, seqLen=32, device="cpu", dtype="float32")
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            print("trainer", run_trainer(config, 1, Path(tmp), 2))
        print("bare", bare_loop(config, 2, "cpu"))
        print("comm", comm_overhead(config, 2, 2, "cpu"))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.render_only:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs a CUDA device; none is visible (the doc rows stay 'owed')")
        config = json.loads(json.dumps(GPU_CONFIG))
        config["training"]["steps"] = args.steps
        from bench_trainer import gpu_flops_per_token

        flops, params = gpu_flops_per_token(config)
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            trainer = run_trainer(config, 1, Path(tmp), args.warmup)
        bare = bare_loop(config, args.warmup)
        for row in (trainer, bare):
            row["mfu"] = flops * row["tokens_per_s"] / H100_BF16_PEAK_FLOPS
        comm = comm_overhead(config, args.block_steps, args.blocks)
        results["run"] = {"trainer": trainer, "bare": bare, "comm": comm, "params": params, "config": config,
                          "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                          "command": (COMMAND + " " + " ".join(sys.argv[1:] if argv is None else argv)).strip()}
        if not math.isfinite(bare["final_loss"]):
            raise SystemExit(f"the bare loop diverged (loss {bare['final_loss']})")
        print(json.dumps({k: v for k, v in results["run"].items() if k != "config"}, indent=2))
        if not args.no_doc:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_doc:
        write_doc(render(results))
        print(f"updated {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

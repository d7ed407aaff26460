"""Time one optimizer step under FSDP2: fused_optim's fused shards against the alternatives.

    python bench/bench_fsdp2.py [--ranks 2] [--repeats 5] [--shapes gpt2-124m|small] [--device cpu|cuda]

Spawns `--ranks` processes (gloo on 127.0.0.1, one thread each: on a 2-core machine, one core
per rank; with --device cuda, nccl and one GPU per rank, e.g. --ranks 1 on one GPU), shards a
model holding the given parameter shapes with `fully_shard` (one module per
param, as per-layer FSDP2 does), gives every param a random DTensor gradient, and times
`opt.step()` of each candidate once per round, in a shuffled order (warm-up first, medians). Each step
ends with a barrier, so a time is the slowest rank's. Rank 0 prints the table and writes the CSV
(bench/results/bench_fsdp2_<device>.csv). The ratio column is median(torch fused AdamW) / median.
"""

import argparse
import csv
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adam import gpt2_small_shapes, repetition_order  # noqa: E402

BASELINE = "torch fused AdamW"


def candidates(device: str) -> dict:
    import fused_optim
    from fused_optim import transformers as hf

    out = {BASELINE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)}
    for backend in ("cpu",) if device == "cpu" else ("cuda", "triton"):
        out.update({
            f"fused_optim AdamW {backend}": lambda ps, b=backend: fused_optim.AdamW(ps, lr=1e-3, backend=b),
            f"fused_optim SMMF {backend}": lambda ps, b=backend: fused_optim.SMMF(ps, lr=1e-3, backend=b),
            f"fused_optim Adafactor {backend}": lambda ps, b=backend: fused_optim.Adafactor(ps, backend=b),
            f"fused_optim HF Adafactor {backend}": lambda ps, b=backend: hf.Adafactor(ps, backend=b),
        })  # fmt: skip
    out["fused_optim SMMF reference"] = lambda ps: fused_optim.SMMF(ps, lr=1e-3, backend="reference")
    out["fused_optim Adafactor reference"] = lambda ps: fused_optim.Adafactor(ps, backend="reference")
    return out


def model_of(shapes, device) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    root = nn.Module()
    root.layers = nn.ModuleList()
    for shape in shapes:
        layer = nn.Module()
        layer.weight = nn.Parameter(torch.randn(shape, device=device) * 0.02)
        root.layers.append(fully_shard(layer))
    return fully_shard(root)


def worker(rank, world, port, shapes, repeats, out, device):
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=600)
    if device == "cuda":
        torch.cuda.set_device(rank)
    backend = "gloo" if device == "cpu" else "nccl"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    torch.set_num_threads(1)
    where = torch.device(device, rank) if device == "cuda" else torch.device("cpu")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    runs = {}
    for name, make in candidates(device).items():
        torch.manual_seed(0)
        model = model_of(shapes, where)
        params = list(model.parameters())
        for p in params:
            local = torch.randn(p.to_local().shape, device=where) * 0.01
            p.grad = DTensor.from_local(
                local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        runs[name] = (make(params), [])
    names = list(runs)
    for r in range(repeats + 1):  # the first round warms up (state creation, plans)
        for name in repetition_order(names, r):  # the same order on every rank
            opt, times = runs[name]
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            if r > 0:
                times.append(time.perf_counter() - start)
    if rank == 0:
        base = statistics.median(runs[BASELINE][1])
        rows = [
            (name, statistics.median(t) * 1e3, base / statistics.median(t)) for name, (_, t) in runs.items()
        ]
        millions = sum(torch.Size(s).numel() for s in shapes) / 1e6
        print(f"{world} ranks ({device}), {millions:.1f}M params, {repeats} repeats")
        print(f"{'candidate':46s} {'ms':>9s} {'x ' + BASELINE:>22s}")
        for name, ms, ratio in rows:
            print(f"{name:46s} {ms:9.1f} {ratio:22.2f}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["candidate", "ranks", "median_ms", "speedup_vs_torch_fused_adamw"])
            writer.writerows((name, world, f"{ms:.3f}", f"{ratio:.3f}") for name, ms, ratio in rows)
        print(f"wrote {out}")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", choices=("gpt2-124m", "small"), default="gpt2-124m")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--csv", type=Path, help="default: bench/results/bench_fsdp2_<device>.csv")
    args = ap.parse_args()
    csv_path = args.csv or Path(__file__).resolve().parent / "results" / f"bench_fsdp2_{args.device}.csv"
    shapes = gpt2_small_shapes() if args.shapes == "gpt2-124m" else [(64, 48), (100,), (33, 7, 5)] * 4
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.ranks, port, shapes, args.repeats, csv_path, args.device), nprocs=args.ranks)


if __name__ == "__main__":
    main()

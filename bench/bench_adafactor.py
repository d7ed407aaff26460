"""Time one Adafactor step: fused_optim's two flavours against what users run today.

    python bench/bench_adafactor.py [--cases gpt2-124m,2000x40x25] [--repeats N]

Candidates, side by side in one process (the method of bench_adam.py: every candidate once per
repetition in a shuffled order, warm-up first, medians and p10-p90):
  fused_optim Adafactor <backend>               torch.optim.Adafactor's flavour, fused
  torch Adafactor foreach / for-loop            torch.optim.Adafactor
  fused_optim transformers.Adafactor <backend>  transformers' flavour, fused
  transformers Adafactor                        transformers.optimization.Adafactor (if installed)
  pytorch_optimizer AdaFactor                   (if installed)
  fused_optim AdamW <backend>, torch fused AdamW  the AdamW step on the same params, for scale
The speedup column is median(baseline) / median(candidate) from the same run, the baseline being
torch Adafactor foreach; the summary also gives the ratios the project tracks (fused vs each peer
of its flavour, fused Adafactor vs fused_optim AdamW). All candidates use lr 1e-2 where they take
one (transformers' flavours their relative step), no weight decay.

Bytes model: the least a fused step must move, charged to every candidate of an algorithm. A
fused Adafactor step reads g three times (statistics, the norm of the update, the update) and the
param twice (its RMS, the update) and writes the param once: 6 x elem per param, 24 B in fp32
(O(rows + cols) of factored state besides). AdamW: 7 x elem, 28 B. GB/s = these bytes / median.
State bytes per param: the optimizer's state tensors after the warm-up, over the param count.
"""

import argparse
import gc
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_adam import (
    device_name,
    gpt2_small_shapes,
    make_timer,
    peak_gbps,
    repetition_order,
    sync,
    write_csv,
)

import fused_optim
import fused_optim.transformers

TorchFlavour = fused_optim.Adafactor
HfFlavour = fused_optim.transformers.Adafactor
BASELINE = "torch Adafactor foreach"
LR = 1e-2
BYTES_PER_ELEM = {"adafactor": 6, "adamw": 7}

CASES = {
    "gpt2-124m": (gpt2_small_shapes(), 9),  # shapes, CPU repeats
    "2000x40x25": ([(40, 25)] * 2000, 15),  # many small matrices, all factored
}


@dataclass
class Candidate:
    name: str
    algorithm: str  # a key of BYTES_PER_ELEM
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    opt: torch.optim.Optimizer | None = None
    times_ms: list[float] = field(default_factory=list)
    state_bytes: int = 0


def candidates(device: torch.device, large: bool, with_reference: bool, notes: list[str]) -> list[Candidate]:
    out = []
    for backend in fused_optim.available_backends(device):
        if backend == "triton" and device.type == "cpu":
            continue  # the Triton interpreter is not a fast path
        if backend == "reference" and device.type == "cpu" and large and not with_reference:
            notes.append("skipped fused_optim reference on the 124M CPU case (slow; add --with-reference)")
            continue
        out.append(Candidate(f"fused_optim Adafactor {backend}", "adafactor",
                             lambda ps, b=backend: TorchFlavour(ps, lr=LR, backend=b)))  # fmt: skip
        out.append(Candidate(f"fused_optim transformers.Adafactor {backend}", "adafactor",
                             lambda ps, b=backend: HfFlavour(ps, backend=b)))  # fmt: skip
    out.append(Candidate("torch Adafactor foreach", "adafactor",
                         lambda ps: torch.optim.Adafactor(ps, lr=LR, foreach=True)))  # fmt: skip
    out.append(Candidate("torch Adafactor for-loop", "adafactor",
                         lambda ps: torch.optim.Adafactor(ps, lr=LR, foreach=False)))  # fmt: skip
    if importlib.util.find_spec("transformers") is not None:

        def hf(ps):
            from transformers.optimization import Adafactor

            return Adafactor(ps)

        out.append(Candidate("transformers Adafactor", "adafactor", hf))
    else:
        notes.append("transformers is not installed: its Adafactor is not timed")
    if importlib.util.find_spec("pytorch_optimizer") is not None:

        def po(ps):
            from pytorch_optimizer import AdaFactor

            return AdaFactor(ps, lr=LR)

        out.append(Candidate("pytorch_optimizer AdaFactor", "adafactor", po))
    else:
        notes.append("pytorch_optimizer is not installed: its AdaFactor is not timed")
    native = "cuda" if device.type == "cuda" else "cpu"
    if native in fused_optim.available_backends(device):
        out.append(Candidate(f"fused_optim AdamW {native}", "adamw",
                             lambda ps: fused_optim.AdamW(ps, lr=1e-3, backend=native)))  # fmt: skip
    out.append(Candidate("torch fused AdamW", "adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)))
    return out


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    )


def run_case(name, shapes, cands, device, repeats, warmup, notes) -> int:
    numel = sum(math.prod(s) for s in shapes)
    torch.manual_seed(0)
    base = [torch.randn(s, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    timed = make_timer(device)
    live = []
    for c in cands:
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # read only by every candidate
        try:
            c.opt = c.build(params)
            for _ in range(warmup):
                c.opt.step()
            sync(device)
        except Exception as e:  # report and go on
            notes.append(f"{name}: {c.name} skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            c.opt = None
            continue
        c.state_bytes = state_bytes(c.opt)
        live.append(c)
    gc.collect()
    gc.disable()
    try:
        for rep in range(repeats if live else 0):
            for c in repetition_order(live, rep):
                c.times_ms.append(timed(c.opt.step))
    finally:
        gc.enable()
    for c in cands:
        c.opt = None
    gc.collect()
    return numel


def rows_for(name, shapes, numel, cands, peak, baseline=BASELINE, bytes_per_elem=None) -> list[dict]:
    """CSV rows; bytes_per_elem maps an algorithm to the elements (x 4 B) a fused step must move."""
    bytes_per_elem = bytes_per_elem or BYTES_PER_ELEM
    med = {c.name: statistics.median(c.times_ms) for c in cands if c.times_ms}
    base = med.get(baseline)
    rows = []
    for c in cands:
        if not c.times_ms:
            continue
        p10, *_, p90 = statistics.quantiles(c.times_ms, n=10, method="inclusive")
        nbytes = round(numel * 4 * bytes_per_elem[c.algorithm])
        gbps = nbytes / (med[c.name] * 1e-3) / 1e9
        rows.append(dict(
            case=name, n_tensors=len(shapes), n_params=numel, candidate=c.name, algorithm=c.algorithm,
            median_ms=round(med[c.name], 4), p10_ms=round(p10, 4), p90_ms=round(p90, 4),
            baseline=baseline, speedup=round(base / med[c.name], 3) if base else "",
            bytes_per_step=nbytes, gbps=round(gbps, 2), frac_of_peak=round(gbps / peak, 3) if peak else "",
            state_bytes_per_param=round(c.state_bytes / numel, 4), repeats=len(c.times_ms),
        ))  # fmt: skip
    return rows


def print_table(rows: list[dict], baseline=BASELINE) -> None:
    head = ["case", "candidate", "median ms", "p10-p90 ms", f"vs {baseline}", "GB/s", "state B/param"]
    lines = [
        [r["case"], r["candidate"], f"{r['median_ms']:.2f}", f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}",
         f"{r['speedup']:.2f}x" if r["speedup"] != "" else "n/a", f"{r['gbps']:.1f}",
         f"{r['state_bytes_per_param']:.3f}"]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(li[i]) for li in lines)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(fmt(head))
    print("  ".join("-" * w for w in widths))
    prev = None
    for r, li in zip(rows, lines, strict=True):
        if prev is not None and r["case"] != prev:
            print()
        prev = r["case"]
        print(fmt(li))


def ratios(rows: list[dict], native: str) -> list[str]:
    """The same-run ratios the issue's targets are stated in."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        med = {r["candidate"]: r["median_ms"] for r in rows if r["case"] == case}
        pairs = [
            (f"fused_optim Adafactor {native}", "torch Adafactor foreach", "speedup"),
            (f"fused_optim Adafactor {native}", "torch Adafactor for-loop", "speedup"),
            (f"fused_optim transformers.Adafactor {native}", "transformers Adafactor", "speedup"),
            (f"fused_optim transformers.Adafactor {native}", "pytorch_optimizer AdaFactor", "speedup"),
            (f"fused_optim Adafactor {native}", f"fused_optim AdamW {native}", "time ratio"),
            (f"fused_optim transformers.Adafactor {native}", f"fused_optim AdamW {native}", "time ratio"),
        ]
        for ours, theirs, kind in pairs:
            if ours in med and theirs in med:
                value = med[theirs] / med[ours] if kind == "speedup" else med[ours] / med[theirs]
                out.append(f"{case}: {ours} vs {theirs}: {kind} {value:.2f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help=f"comma list of {', '.join(CASES)} (default: all)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    ap.add_argument(
        "--repeats", type=int, help="timed steps per candidate (default: per case on CPU, 50 on CUDA)"
    )
    ap.add_argument("--warmup", type=int, help="untimed steps per candidate first (default: CPU 2, CUDA 5)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument(
        "--with-reference", action="store_true", help="time the reference backend on the 124M case"
    )
    ap.add_argument("--peak-gbps", type=float, help="device peak memory bandwidth, if torch cannot tell")
    ap.add_argument("--csv", type=Path, help="default: bench/results/bench_adafactor_<device>.csv")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    names = [n.strip() for n in args.cases.split(",")] if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 2)
    peak = peak_gbps(device, args.peak_gbps)
    csv_path = args.csv or Path(__file__).resolve().parent / "results" / f"bench_adafactor_{device.type}.csv"
    meta = dict(device=str(device), device_name=device_name(device), torch_version=torch.__version__,
                fused_optim_version=fused_optim.__version__, dtype="float32", threads=torch.get_num_threads(),
                warmup=warmup)  # fmt: skip
    print(f"device: {meta['device_name']} ({device}); torch {torch.__version__}; threads {meta['threads']}")
    print(
        "Bytes model: fused Adafactor 6 x elem per param (24 B fp32: g read 3x, param read 2x, written 1x);"
    )
    print("  AdamW 7 x elem (28 B). Each candidate is charged its algorithm's fused minimum.\n")

    rows, notes = [], []
    for name in names:
        shapes, cpu_repeats = CASES[name]
        repeats = args.repeats or (50 if on_gpu else cpu_repeats)
        cands = candidates(device, name == "gpt2-124m", args.with_reference, notes)
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: {len(shapes)} tensors, "
              f"{len(cands)} candidates, {repeats} repeats", file=sys.stderr, flush=True)  # fmt: skip
        numel = run_case(name, shapes, cands, device, repeats, warmup, notes)
        rows += rows_for(name, shapes, numel, cands, peak)
        if rows:
            write_csv(csv_path, rows, meta)
    if not rows:
        sys.exit("no candidate ran")
    print_table(rows)
    print()
    for line in ratios(rows, "cuda" if on_gpu else "cpu"):
        print(line)
    for n in notes:
        print("note:", n)
    print(f"CSV: {csv_path}")
    print(f"total time: {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time one SMMF step: fused_optim.SMMF against what users would run instead.

    python bench/bench_smmf.py [--cases gpt2-124m,2000x40x25] [--repeats N] [--only 'SMMF cpu,torch']

Candidates, side by side in one process (bench_adam.py's method: every candidate once per
repetition in a shuffled order, warm-up first, medians and p10-p90):
  fused_optim SMMF <backend>       the fused kernels (cpu / cuda / triton on a GPU)
  fused_optim SMMF reference       the project's per-tensor PyTorch implementation of the authors'
                                   algorithm (their SMMF.py is not a package; the reference is
                                   tested against their rule)
  adv_optm AdamW_adv (nnmf)        AdamW_adv(nnmf_factor=True, vector_reshape=True), adv_optm's
                                   SMMF-style factored AdamW with 1-bit signs (if installed)
  fused_optim AdamW <backend>, torch fused AdamW   the dense optimizer SMMF replaces
The speedup column is median(torch fused AdamW) / median(candidate), from the same run. lr 1e-3,
no weight decay, every other setting the optimizer's default.

Bytes model: the least a fused step must move per fp32 param. SMMF reads g and theta and writes
theta (12 B) and reads and writes one sign bit (0.25 B): 12.25 B; AdamW 28 B. GB/s = these bytes /
median. State bytes per param: the optimizer's state tensors after the warm-up, over the params.
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from bench_adafactor import Candidate, print_table, rows_for, run_case
from bench_adam import device_name, gpt2_small_shapes, peak_gbps, write_csv

import fused_optim

BASELINE = "torch fused AdamW"
LR = 1e-3
BYTES_PER_ELEM = {"smmf": 12.25 / 4, "adamw": 7}

CASES = {
    "gpt2-124m": (gpt2_small_shapes(), 7),  # shapes, CPU repeats
    "2000x40x25": ([(40, 25)] * 2000, 15),  # many small matrices
}


def candidates(device: torch.device, notes: list[str]) -> list[Candidate]:
    out = []
    for backend in fused_optim.available_backends(device):
        if backend == "triton" and device.type == "cpu":
            continue  # the Triton interpreter is not a fast path
        out.append(Candidate(f"fused_optim SMMF {backend}", "smmf",
                             lambda ps, b=backend: fused_optim.SMMF(ps, lr=LR, backend=b)))  # fmt: skip
    if importlib.util.find_spec("adv_optm") is not None:

        def adv(ps):
            from adv_optm import AdamW_adv

            return AdamW_adv(ps, lr=LR, nnmf_factor=True, vector_reshape=True)

        out.append(Candidate("adv_optm AdamW_adv (nnmf)", "smmf", adv))
    else:
        notes.append("adv_optm is not installed (pip install adv-optm): its factored AdamW is not timed")
    native = "cuda" if device.type == "cuda" else "cpu"
    if native in fused_optim.available_backends(device):
        out.append(Candidate(f"fused_optim AdamW {native}", "adamw",
                             lambda ps: fused_optim.AdamW(ps, lr=LR, backend=native)))  # fmt: skip
    out.append(Candidate(BASELINE, "adamw", lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True)))
    return out


def ratios(rows: list[dict], native: str) -> list[str]:
    """The same-run ratios the issue's targets are stated in."""
    out = []
    ours = f"fused_optim SMMF {native}"
    for case in dict.fromkeys(r["case"] for r in rows):
        med = {r["candidate"]: r["median_ms"] for r in rows if r["case"] == case}
        if ours not in med:
            continue
        if BASELINE in med:
            out.append(f"{case}: {ours} / {BASELINE}: time ratio {med[ours] / med[BASELINE]:.2f}")
        for theirs in ("fused_optim SMMF reference", "adv_optm AdamW_adv (nnmf)"):
            if theirs in med:
                out.append(f"{case}: {ours} vs {theirs}: speedup {med[theirs] / med[ours]:.1f}")
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
    ap.add_argument("--peak-gbps", type=float, help="device peak memory bandwidth, if torch cannot tell")
    ap.add_argument("--csv", type=Path, help="default: bench/results/bench_smmf_<device>.csv")
    ap.add_argument(
        "--only",
        help="comma list of words: time only the candidates whose names contain one of them, e.g. "
        "'SMMF cpu,torch' for quick pairs (default: all)",
    )
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
    csv_path = args.csv or Path(__file__).resolve().parent / "results" / f"bench_smmf_{device.type}.csv"
    meta = dict(device=str(device), device_name=device_name(device), torch_version=torch.__version__,
                fused_optim_version=fused_optim.__version__, dtype="float32", threads=torch.get_num_threads(),
                warmup=warmup)  # fmt: skip
    print(f"device: {meta['device_name']} ({device}); torch {torch.__version__}; threads {meta['threads']}")
    print("Bytes model: fused SMMF 12.25 B per fp32 param (g and theta read, theta written, a sign bit read")
    print("  and written); AdamW 28 B. Each candidate is charged its algorithm's fused minimum.\n")

    rows, notes = [], []
    for name in names:
        shapes, cpu_repeats = CASES[name]
        repeats = args.repeats or (50 if on_gpu else cpu_repeats)
        cands = candidates(device, notes)
        if args.only:
            words = [w.strip() for w in args.only.split(",")]
            cands = [c for c in cands if any(w in c.name for w in words)]
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: {len(shapes)} tensors, "
              f"{len(cands)} candidates, {repeats} repeats", file=sys.stderr, flush=True)  # fmt: skip
        numel = run_case(name, shapes, cands, device, repeats, warmup, notes)
        rows += rows_for(name, shapes, numel, cands, peak, BASELINE, BYTES_PER_ELEM)
        if rows:
            write_csv(csv_path, rows, meta)
    if not rows:
        sys.exit("no candidate ran")
    print_table(rows, BASELINE)
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

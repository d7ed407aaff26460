"""Time one AdamW step: fused_optim (every available backend) against torch.optim and apex.

    python bench/bench_adam.py [--cases gpt2-124m,2000x1000] [--dtype bfloat16] [--repeats N]

Method. All candidates of a case are built side by side in one process. Each repetition steps every
candidate once, in a new shuffled order (seeded by the repetition), so machine noise and ordering
effects fall on all of them alike (a fixed round-robin gives each candidate the same predecessor
every time). Warm-up steps come first (the first step allocates the optimizer state). One step is
timed with time.perf_counter on CPU, with CUDA events after a synchronize on GPU (so host-side
launch overhead counts). Reported: median and p10-p90 in ms; the speedup is median(torch fused) /
median(candidate) from the same run. Gradients are filled once with randn and reused: the steps only
read them, except torch's clip_grad_norm_, which rescales them in place, so the clip baselines get
their own copy.

Bytes model: the minimum a step must move, charged to EVERY candidate of a case.
  AdamW without amsgrad reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,
  exp_avg_sq: 7 x element size per param = 28 B in fp32, 14 B in bf16 (states take the params'
  dtype). With global-norm clipping the fused step reads the grad once more for the norm: +1 x
  element (32 B fp32). torch's clip_grad_norm_ + step moves more (+3: the grad is read for the norm,
  then read and written to scale it) but is charged the same fused minimum, so achieved GB/s
  compares like for like (it is the speedup in other units, anchored to what the hardware can do).
"""

import argparse
import csv
import gc
import importlib.util
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fused_optim

HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
MAX_NORM = 1.0
REFERENCE = "torch fused"  # the speedup column is relative to this candidate
BYTES_MODEL = (
    "Bytes model: AdamW (no amsgrad) reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,\n"
    "  exp_avg_sq = 7 x elem per param (fp32 28 B, bf16 14 B); fused clipping reads the grad once more\n"
    "  for the norm (+1 x elem). torch's clip_grad_norm_ + step really moves +3 x elem (grad read for the\n"
    "  norm, read+written to scale it), but every candidate of a case is charged the SAME bytes (the\n"
    "  fused minimum), so GB/s compares like for like."
)


# ---- cases ------------------------------------------------------------------------------------


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1 weight, bias
        shapes += [(d, 3 * d), (3 * d,)]  # attn.c_attn (GPT-2 Conv1D: in x out)
        shapes += [(d, d), (d,)]  # attn.c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]  # mlp.c_fc
        shapes += [(4 * d, d), (d,)]  # mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


@dataclass(frozen=True)
class Case:
    name: str
    shapes: list[tuple[int, ...]]
    clip: bool = False
    large: bool = False  # ~124M params: the CPU default skips the slow reference backend here
    cpu_repeats: int = 15  # defaults that keep the CPU run within a few minutes
    cuda_only: bool = False  # part of the default list on CUDA only


CASES = {
    c.name: c
    for c in (
        Case("gpt2-124m", gpt2_small_shapes(), large=True, cpu_repeats=15),
        Case("2000x1000", [(1000,)] * 2000, cpu_repeats=25),
        Case("gpt2-124m+clip", gpt2_small_shapes(), clip=True, large=True, cpu_repeats=15),
        Case("10-large", [(16 * 2**20,)] * 10, large=True, cpu_repeats=7, cuda_only=True),
        Case("1000-small", [(4096,)] * 1000, cuda_only=True),
    )
}


# ---- candidates -------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    build: Callable[[list[torch.Tensor]], Callable[[], None]]  # params (grads set) -> step()
    rescales_grads: bool = False  # torch's clip_grad_norm_ writes the grads: gets its own copy
    step: Callable[[], None] | None = None
    times_ms: list[float] = field(default_factory=list)
    kernels: int | None = None


def fused_optim_candidate(backend: str, clip: bool) -> Candidate:
    def build(params):
        opt = fused_optim.AdamW(params, **HP, backend=backend, max_grad_norm=MAX_NORM if clip else None)
        return opt.step

    return Candidate(f"fused_optim {backend}", build)


def with_clip(opt, params, clip: bool, clip_foreach: bool | None) -> Callable[[], None]:
    if not clip:
        return opt.step

    def step():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=clip_foreach)
        opt.step()

    return step


def torch_candidate(name: str, clip: bool, clip_foreach: bool | None, **impl) -> Candidate:
    def build(params):
        return with_clip(torch.optim.AdamW(params, **HP, **impl), params, clip, clip_foreach)

    return Candidate(name, build, rescales_grads=clip)


def apex_candidate(clip: bool) -> Candidate:
    def build(params):
        from apex.optimizers import FusedAdam

        return with_clip(FusedAdam(params, **HP, adam_w_mode=True), params, clip, None)

    return Candidate("apex FusedAdam", build, rescales_grads=clip)


def candidates_for(case: Case, device: torch.device, args, notes: list[str]) -> list[Candidate]:
    out = []
    for backend in fused_optim.available_backends(device):
        if backend == "triton" and device.type == "cpu":
            notes.append(
                f"{case.name}: skipped fused_optim triton on CPU (the Triton interpreter is not a fast path)"
            )
            continue
        if backend == "reference" and device.type == "cpu" and case.large and not args.with_reference:
            notes.append(f"{case.name}: skipped fused_optim reference on CPU (slow; add --with-reference)")
            continue
        out.append(fused_optim_candidate(backend, case.clip))
    # foreach=None lets clip_grad_norm_ pick its foreach path where the device has one (not on CPU).
    out.append(torch_candidate("torch fused", case.clip, None, fused=True))
    out.append(torch_candidate("torch foreach", case.clip, None, foreach=True))
    out.append(torch_candidate("torch for-loop", case.clip, False, foreach=False))
    if device.type == "cuda" and importlib.util.find_spec("apex") is not None:
        out.append(apex_candidate(case.clip))
    return out


# ---- timing -----------------------------------------------------------------------------------


def make_timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(step):
            torch.cuda.synchronize(device)  # nothing queued before the start event
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return timed

    def timed(step):
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3

    return timed


def count_kernels(step: Callable[[], None], device: torch.device) -> int | None:
    """GPU kernels one step launches (memcpy/memset excluded), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(1 for e in gpu if not e.name.startswith(("Memcpy", "Memset")))
    except Exception:  # the profiler is optional: no CUPTI, etc.
        return None


def repetition_order(candidates: list, rep: int) -> list:
    """The order in which repetition `rep` steps the candidates: a shuffle seeded by rep."""
    return random.Random(rep).sample(candidates, len(candidates))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case, cands, device, dtype, repeats, warmup, budget_bytes, notes) -> dict:
    esize = torch.empty((), dtype=dtype).element_size()
    numel = sum(math.prod(s) for s in case.shapes)
    copy_grads = any(c.rescales_grads for c in cands)
    # Tensors held at once: base params, grads (+ the clip baselines' copy), per candidate two
    # states and its own params. Above the budget the candidates' params alias one storage (each
    # still has its own tensor objects, .grad and state): numerically harmless, and at this size
    # (far beyond any cache) it does not flatter anyone's timing.
    own = numel * esize * (2 + copy_grads + 3 * len(cands))
    share = own > budget_bytes
    if share:
        notes.append(
            f"{case.name}: params alias one storage across candidates "
            f"({own / 2**30:.1f} GiB otherwise > --mem-budget-gb)"
        )

    torch.manual_seed(0)
    base = [torch.randn(s, device=device, dtype=dtype) * 0.02 for s in case.shapes]
    grads = [torch.randn(s, device=device, dtype=dtype) for s in case.shapes]
    clip_grads = [g.clone() for g in grads] if copy_grads else None

    timed = make_timer(device)
    live = []
    for c in cands:
        params = [b.detach() if share else b.clone() for b in base]
        for p, g in zip(params, clip_grads if c.rescales_grads else grads, strict=True):
            p.grad = g
        try:
            c.step = c.build(params)
            for _ in range(warmup):
                c.step()
            sync(device)
        except Exception as e:  # e.g. a dtype a baseline does not support: report, go on
            notes.append(
                f"{case.name}: {c.name} skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            )
            c.step = None
            continue
        live.append(c)

    gc.collect()
    gc.disable()  # no collector pauses inside timed steps
    try:
        for rep in range(repeats if live else 0):
            for c in repetition_order(live, rep):
                c.times_ms.append(timed(c.step))
    finally:
        gc.enable()
    if device.type == "cuda":
        for c in live:
            c.kernels = count_kernels(c.step, device)

    for c in cands:  # free the optimizers (and their states) before the next case
        c.step = None
    del base, grads, clip_grads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    per_param = esize * (7 + (1 if case.clip else 0))
    return dict(candidates=live, numel=numel, bytes=numel * per_param, per_param=per_param, shared=share)


# ---- reporting --------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_gbps(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return clock_khz * 1e3 * 2 * bus_bits / 8 / 1e9  # double data rate


def rows_for(case: Case, res: dict, peak: float | None) -> list[dict]:
    stats = {}
    for c in res["candidates"]:
        p10, *_, p90 = statistics.quantiles(c.times_ms, n=10, method="inclusive")
        stats[c.name] = (statistics.median(c.times_ms), p10, p90, c.kernels, len(c.times_ms))
    ref = stats.get(REFERENCE, (None,))[0]
    rows = []
    for name, (med, p10, p90, kernels, n) in stats.items():
        gbps = res["bytes"] / (med * 1e-3) / 1e9
        rows.append(
            dict(
                case=case.name,
                n_tensors=len(case.shapes),
                n_params=res["numel"],
                bytes_per_step=res["bytes"],
                params_shared=res["shared"],
                candidate=name,
                median_ms=round(med, 4),
                p10_ms=round(p10, 4),
                p90_ms=round(p90, 4),
                speedup_vs_torch_fused=round(ref / med, 3) if ref else "",
                gbps=round(gbps, 2),
                peak_gbps=round(peak, 1) if peak else "",
                frac_of_peak=round(gbps / peak, 3) if peak else "",
                kernels_per_step="" if kernels is None else kernels,
                repeats=n,
            )
        )
    return rows


def print_table(rows: list[dict], show_peak: bool, show_kernels: bool) -> None:
    head = ["case", "candidate", "median ms", "p10-p90 ms", "vs torch fused", "GB/s"]
    head += ["% peak"] * show_peak + ["kernels"] * show_kernels
    lines = []
    for r in rows:
        sp = r["speedup_vs_torch_fused"]
        line = [
            r["case"],
            r["candidate"],
            f"{r['median_ms']:.3f}",
            f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}",
            f"{sp:.2f}x" if sp != "" else "n/a",
            f"{r['gbps']:.1f}",
        ]
        if show_peak:
            line.append(f"{100 * r['frac_of_peak']:.1f}" if r["frac_of_peak"] != "" else "n/a")
        if show_kernels:
            line.append(str(r["kernels_per_step"]) or "n/a")
        lines.append(line)
    widths = [max(len(h), *(len(li[i]) for li in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(  # text columns left, numbers right
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


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help=f"comma list of {', '.join(CASES)} (default: all for the device)")
    ap.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--repeats", type=int, help="timed steps per candidate (default: per case, CPU 15-25, CUDA 100)"
    )
    ap.add_argument("--warmup", type=int, help="untimed steps per candidate first (default: CPU 2, CUDA 5)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument(
        "--with-reference", action="store_true", help="time the reference backend on the 124M CPU cases"
    )
    ap.add_argument("--peak-gbps", type=float, help="device peak memory bandwidth, if torch cannot tell")
    ap.add_argument(
        "--mem-budget-gb", type=float, default=6.0, help="alias params across candidates above this"
    )
    ap.add_argument("--csv", type=Path, help="default: bench/results/bench_adam_<device>.csv")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    if args.cases:
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown:
            sys.exit(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    else:
        names = [n for n, c in CASES.items() if on_gpu or not c.cuda_only]
    if args.repeats is not None and args.repeats < 3:
        sys.exit("--repeats must be >= 3 (the p10-p90 band needs a few samples)")
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 2)
    peak = peak_gbps(device, args.peak_gbps)
    csv_path = args.csv or Path(__file__).resolve().parent / "results" / f"bench_adam_{device.type}.csv"

    meta = dict(
        device=str(device),
        device_name=device_name(device),
        torch_version=torch.__version__,
        fused_optim_version=fused_optim.__version__,
        dtype=args.dtype,
        threads=torch.get_num_threads(),
        warmup=warmup,
    )
    print(f"device: {meta['device_name']} ({device})")
    print(f"torch {torch.__version__}; fused_optim {fused_optim.__version__}; dtype {args.dtype}")
    print(f"threads {meta['threads']}; warm-up {warmup}; backends {fused_optim.available_backends(device)}")
    if peak:
        print(f"peak memory bandwidth: {peak:.0f} GB/s")
    print(f"hyper-parameters: AdamW {HP}; clip cases max_grad_norm={MAX_NORM}")
    print(BYTES_MODEL)
    print()

    rows, notes = [], []
    for name in names:
        case = CASES[name]
        repeats = args.repeats or (100 if on_gpu else case.cpu_repeats)
        cands = candidates_for(case, device, args, notes)
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: {len(case.shapes)} tensors, "
              f"{sum(math.prod(s) for s in case.shapes):,} params, {len(cands)} candidates, "
              f"{repeats} repeats", file=sys.stderr, flush=True)  # fmt: skip
        res = run_case(case, cands, device, dtype, repeats, warmup, args.mem_budget_gb * 2**30, notes)
        if res["candidates"]:
            rows += rows_for(case, res, peak)
            write_csv(csv_path, rows, meta)  # after every case, so a cut-short run keeps its results

    if not rows:
        sys.exit("no candidate ran")
    print_table(rows, show_peak=peak is not None, show_kernels=on_gpu)
    print()
    for name in names:
        r = next((r for r in rows if r["case"] == name), None)
        if r:
            print(f"{name}: {r['n_tensors']} tensors, {r['n_params']:,} params, "
                  f"{r['bytes_per_step'] / 1e9:.3f} GB charged per step "
                  f"({r['bytes_per_step'] // r['n_params']} B/param), {r['repeats']} repeats")  # fmt: skip
    if any(CASES[n].clip for n in names):
        print("clip cases: torch/apex candidates = torch.nn.utils.clip_grad_norm_(params, 1.0) + step; "
              "fused_optim = AdamW(max_grad_norm=1.0)")  # fmt: skip
    for n in notes:
        print("note:", n)
    if on_gpu:
        print(f"max GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    try:
        import resource

        print(f"max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    except ImportError:  # not on Windows
        pass
    print(f"CSV: {csv_path}")
    print(f"total time: {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

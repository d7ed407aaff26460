"""Bar chart of a bench_adam.py or bench_adafactor.py CSV: speedup vs the baseline, per case and
candidate.

python bench/plot.py [bench/results/bench_adam_cpu.csv] [--out chart.png]

Each bar is median(baseline) / median(candidate); its whisker spans the candidate's p10-p90 step
time (median(baseline) / p90 .. / p10). The baseline is torch fused AdamW in bench_adam.py's CSV
(column speedup_vs_torch_fused), the CSV's `baseline` column in bench_adafactor.py's (`speedup`).
Exits non-zero, saying why, when it cannot draw: no matplotlib, a missing or unreadable CSV, or
no rows with a speedup in it.
"""

import argparse
import csv
import math
import sys
from pathlib import Path

NEEDED = ("case", "candidate", "median_ms", "p10_ms", "p90_ms")
SPEEDUP_COLUMNS = ("speedup_vs_torch_fused", "speedup")  # bench_adam.py's, bench_adafactor.py's


def fail(msg: str) -> int:
    print(f"plot.py: {msg}", file=sys.stderr)
    return 1


def read_rows(path: Path) -> list[dict]:
    """The CSV's rows that have a speedup; raises ValueError with the reason when it has none."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        speedup = next((c for c in SPEEDUP_COLUMNS if c in fields), None)
        missing = [c for c in NEEDED if c not in fields] + ([] if speedup else ["speedup"])
        if missing:
            cols = ", ".join(missing)
            raise ValueError(f"{path} is empty or not a bench CSV (no column(s) {cols})")
        rows = [dict(r, speedup=r[speedup]) for r in reader if r[speedup]]
    if not rows:
        raise ValueError(f"no rows with a speedup in {path}")
    return rows


def speedup_ticks(lo: float, hi: float) -> list[float]:
    """Powers of two covering [lo, hi], at most ~8 of them: 0.5, 1, 2, 4, ... (or 1, 4, 16, ...)."""
    a, b = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    step = max(1, math.ceil((b - a + 1) / 8))
    return [2.0**e for e in range(a - (a % step), b + 1, step)]


def tick_label(y: float, _pos=None) -> str:
    return f"{y:g}×" if y >= 1 else f"{y:.3g}×"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_csv = Path(__file__).resolve().parent / "results" / "bench_adam_cpu.csv"
    ap.add_argument("csv", type=Path, nargs="?", default=default_csv)
    ap.add_argument("--out", type=Path, help="PNG path (default: the CSV's path with .png)")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError as exc:
        return fail(f"matplotlib is not installed ({exc}); `pip install matplotlib`; no chart written")

    try:
        rows = read_rows(args.csv)
    except FileNotFoundError:
        return fail(f"no CSV at {args.csv} (run bench/bench_adam.py first); no chart written")
    except (OSError, csv.Error, ValueError) as exc:
        return fail(f"{exc}; no chart written")

    cases = list(dict.fromkeys(r["case"] for r in rows))  # order of appearance
    cands = list(dict.fromkeys(r["candidate"] for r in rows))
    try:
        stat = {
            (r["case"], r["candidate"]): tuple(
                float(r[k]) for k in ("speedup", "median_ms", "p10_ms", "p90_ms")
            )
            for r in rows
        }
    except ValueError as exc:
        return fail(f"{args.csv}: a non-numeric speedup or time ({exc}); no chart written")
    color = {c: f"C{i % 10}" for i, c in enumerate(cands)}

    width = 0.8 / len(cands)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases) * len(cands) / 3), 4.5))
    labelled, lo, hi = set(), 1.0, 1.0
    for ci, case in enumerate(cases):
        present = [c for c in cands if (case, c) in stat]  # centre the bars this case has
        for i, cand in enumerate(present):
            s, med, p10, p90 = stat[case, cand]
            # The speedup the candidate's p90 / p10 step time gives against the same reference median.
            s_lo, s_hi = (s * med / p90, s * med / p10) if p10 > 0 and p90 > 0 else (s, s)
            x = ci + (i - (len(present) - 1) / 2) * width
            ax.bar(
                x,
                s,
                width,
                color=color[cand],
                label=None if cand in labelled else cand,
                yerr=[[max(s - s_lo, 0.0)], [max(s_hi - s, 0.0)]],
                error_kw=dict(elinewidth=0.8, capsize=2, ecolor="black"),
            )
            labelled.add(cand)
            top = max(s, s_hi)  # the value above the whisker, not under it
            ax.text(x, top * 1.06, f"{s:.2f}×", ha="center", va="bottom", fontsize=7, rotation=90)
            lo, hi = min(lo, s, s_lo), max(hi, s, s_hi)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")  # speedups span orders of magnitude (for-loop vs fused)
    ax.yaxis.set_major_locator(FixedLocator(speedup_ticks(lo, hi)))
    ax.yaxis.set_major_formatter(FuncFormatter(tick_label))  # 1×, 2×, 4×, not 10^0
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(lo / 1.3, hi * 2.2)  # room for the bar labels
    ax.set_xticks(range(len(cases)), cases)
    r0 = rows[0]
    baseline = r0.get("baseline", "torch fused")
    ax.set_ylabel(f"speedup vs {baseline} (higher is faster)")
    step = "Adafactor" if "baseline" in r0 else "AdamW"
    ax.set_title(
        f"{step} step, {r0.get('dtype', '?')}, {r0.get('device_name', '?')}, "
        f"torch {r0.get('torch_version', '?')}"
        "\nwhiskers: each candidate's p10–p90 step time",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or args.csv.with_suffix(".png")
    try:
        fig.savefig(out, dpi=120)
    except OSError as exc:
        return fail(f"cannot write {out}: {exc}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bar chart of a bench_adam.py CSV: speedup vs torch fused, per case and candidate.

python bench/plot.py [bench/results/bench_adam_cpu.csv] [--out chart.png]
"""

import argparse
import csv
import sys
from pathlib import Path


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
    except ImportError:
        print("plot.py: matplotlib is not installed (pip install matplotlib); no chart written.")
        return 0

    with open(args.csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["speedup_vs_torch_fused"]]
    if not rows:
        sys.exit(f"plot.py: no rows with a speedup in {args.csv}")
    cases = list(dict.fromkeys(r["case"] for r in rows))  # order of appearance
    cands = list(dict.fromkeys(r["candidate"] for r in rows))
    speedup = {(r["case"], r["candidate"]): float(r["speedup_vs_torch_fused"]) for r in rows}

    width = 0.8 / len(cands)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases) * len(cands) / 3), 4.5))
    for i, cand in enumerate(cands):
        xs = [
            ci + (i - (len(cands) - 1) / 2) * width
            for ci, case in enumerate(cases)
            if (case, cand) in speedup
        ]
        ys = [speedup[case, cand] for case in cases if (case, cand) in speedup]
        bars = ax.bar(xs, ys, width, label=cand)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, rotation=90, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")  # speedups span orders of magnitude (for-loop vs fused)
    ax.margins(y=0.15)  # room for the bar labels
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("speedup vs torch fused (higher is faster)")
    r0 = rows[0]
    ax.set_title(f"AdamW step, {r0['dtype']}, {r0['device_name']}, torch {r0['torch_version']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or args.csv.with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cross-cuts of a study.json that study.md does not print: per data source (mean over the
divergences and seeds), steps per minute, and how far the CHOICE and REPORT splits agree.

    python docs/results/study/grid/summarise.py docs/results/study/grid/study.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def mean(values):
    return statistics.fmean(values) if values else float("nan")


def main(path: str) -> None:
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    sources = list(dict.fromkeys(c["data"] for c in cells))
    divergences = list(dict.fromkeys(c["divergence"] for c in cells))
    print("| data source | steps/min | α_t0 choice | α_t0 report | α_t1 choice | α_t1 report |")
    print("|---|---|---|---|---|---|")
    for source in sources:
        group = [c for c in cells if c["data"] == source]
        print(f"| {source} | {mean([c['steps_per_minute'] for c in group]):.0f} | "
              + " | ".join(f"{mean([c[key] for c in group]):.3f}" for key in
                           ("alpha_t0", "report_alpha_t0", "alpha_t1", "report_alpha_t1")) + " |")
    print()
    print("Seed spread (|seed 0 − seed 1|) per (divergence, data source), mean and max:")
    pairs = defaultdict(list)
    for c in cells:
        pairs[(c["divergence"], c["data"])].append(c)
    for key in ("alpha_t0", "alpha_t1", "report_alpha_t0", "report_alpha_t1"):
        spreads = [abs(g[0][key] - g[1][key]) for g in pairs.values() if len(g) == 2]
        print(f"  {key}: mean {mean(spreads):.3f}, max {max(spreads):.3f}")
    print()
    print("Choice vs report, mean over seeds per (divergence, data source): rank agreement")
    means = {k: {key: mean([c[key] for c in g]) for key in
                 ("alpha_t0", "report_alpha_t0", "alpha_t1", "report_alpha_t1")}
             for k, g in pairs.items()}
    for decoding in ("t0", "t1"):
        choice = sorted(means, key=lambda k: -means[k][f"alpha_{decoding}"])
        report = sorted(means, key=lambda k: -means[k][f"report_alpha_{decoding}"])
        ranks = {k: i for i, k in enumerate(report)}
        n = len(choice)
        rho = 1 - 6 * sum((i - ranks[k]) ** 2 for i, k in enumerate(choice)) / (n * (n * n - 1))
        print(f"  T{decoding[1]}: choice winner {choice[0]}, report winner {report[0]}, "
              f"Spearman {rho:.2f}; top 3 choice {choice[:3]}, report {report[:3]}")
    print()
    print("Best divergence per data source (mean over seeds, choice / report):")
    for decoding in ("t0", "t1"):
        for source in sources:
            best_c = max(divergences, key=lambda d: means[(d, source)][f"alpha_{decoding}"])
            best_r = max(divergences, key=lambda d: means[(d, source)][f"report_alpha_{decoding}"])
            print(f"  T{decoding[1]} {source}: {best_c} / {best_r}")


if __name__ == "__main__":
    main(sys.argv[1])

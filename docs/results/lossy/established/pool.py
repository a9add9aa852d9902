"""Pool the confirmation runs of the lenience choice: per run and over all runs, tokens/s and τ of
lossless SD and the chosen lossy setup, and the paired difference of pass@1 (and of the target's
log-likelihood per token) on the same problems and seeds: row by row, and per problem (its rows'
mean difference; samples of one problem are not independent, so the interval over the problems
is the sounder one).

    python pool.py confirm-a confirm-b confirm-c > pooled.txt
"""

import json
import math
import statistics
import sys
from pathlib import Path


def paired(values, unit="rows"):
    mean = statistics.mean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] ({len(values)} {unit})"


def per_problem(differences):
    """{(run, key, sample): difference} -> the mean difference of each problem (key)."""
    problems = {}
    for (_, key, _), value in differences.items():
        problems.setdefault(key, []).append(value)
    return [statistics.mean(values) for values in problems.values()]


def main(folders):
    rows, speed = {}, {}
    for folder in map(Path, folders):
        report = json.loads((folder / "eval.json").read_text())
        line = []
        for entry in report["setups"]:
            speed.setdefault(entry["setup"], []).append(entry)
            line.append(f"{entry['setup']} {entry['tokens_per_s']:.2f} tok/s, τ "
                        f"{entry['block_efficiency']:.2f}, pass@1 {entry['pass_at_k']['1']:.3f}")
        print(f"{folder.name} (in this order): " + "; ".join(line))
        for text in (folder / "samples.jsonl").read_text().splitlines():
            sample = json.loads(text)
            rows.setdefault(sample["setup"], {})[folder.name, sample["key"], sample["sample"]] = (
                float(sample["status"] == "passed"), sample["log_likelihood"])
    lossless = next(s for s in speed if ":" not in s.partition(":")[2])
    (lossy,) = [s for s in speed if s != lossless]
    for name in (lossless, lossy):
        entries = speed[name]
        tokens, wall = sum(e["kept_tokens"] for e in entries), sum(e["wall_s"] for e in entries)
        print(f"{name}: pooled {tokens / wall:.2f} tok/s ({tokens} tokens in {wall:.0f} s), "
              f"mean τ {statistics.mean(e['block_efficiency'] for e in entries):.3f}")
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(speed[lossless], speed[lossy])]
    print(f"{lossy} ÷ {lossless}, run by run: " + ", ".join(f"{r:.2f}×" for r in ratios))
    pooled = [sum(e["kept_tokens"] for e in speed[s]) / sum(e["wall_s"] for e in speed[s])
              for s in (lossless, lossy)]
    print(f"{lossy} ÷ {lossless}, pooled tokens/s: {pooled[1] / pooled[0]:.3f}×")
    keys = sorted(rows[lossless])
    passes = {k: rows[lossy][k][0] - rows[lossless][k][0] for k in keys}
    print(f"pass@1: {lossless} {statistics.mean(rows[lossless][k][0] for k in keys):.3f}, "
          f"{lossy} {statistics.mean(rows[lossy][k][0] for k in keys):.3f}; paired by row "
          f"{paired(list(passes.values()))}, by problem {paired(per_problem(passes), 'problems')}")
    likelihood = {k: rows[lossy][k][1] - rows[lossless][k][1] for k in keys
                  if rows[lossy][k][1] is not None and rows[lossless][k][1] is not None}
    print(f"log-likelihood per token, paired by row {paired(list(likelihood.values()))}, "
          f"by problem {paired(per_problem(likelihood), 'problems')}")


if __name__ == "__main__":
    main(sys.argv[1:])

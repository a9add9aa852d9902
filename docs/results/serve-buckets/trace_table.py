"""Per arm and batch size, the median step time and tokens/s per row of a server's step trace
(trace_serve.py), decoding steps only; then the admission steps and the whole level.

    python trace_table.py trace_sd.jsonl.gz [MIN_BATCH]     # default 9: the 16-client level
"""
import collections
import gzip
import json
import statistics
import sys

path, least = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 9
opener = gzip.open if path.endswith(".gz") else open
with opener(path, "rt") as lines:
    steps = [json.loads(line) for line in lines]
name = {None: "as configured", 1: "gamma1", 0: "plain"}  # a server without a draft: plain
groups = collections.defaultdict(list)
for step in steps:
    if not step["admitting"] and step["batch"] >= least:
        groups[(name[step["arm"]], step["batch"])].append(step)
print("| arm | rows | steps | median ms a step | median tokens/s per row |\n|---|---|---|---|---|")
for (arm, rows), group in sorted(groups.items()):
    ms = 1e3 * statistics.median(s["s"] for s in group)
    per_row = statistics.median(s["tokens"] / s["batch"] / s["s"] for s in group)
    print(f"| {arm} | {rows} | {len(group)} | {ms:.1f} | {per_row:.2f} |")
first = next(i for i, s in enumerate(steps) if s["batch"] >= least)
level = steps[max(first - 10, 0):]  # from the last steps before the level's first full batch
admitting = [s for s in level if s["admitting"]]
print(f"\nfrom the level's start: {len(level)} steps, {sum(s['s'] for s in level):.1f} s, "
      f"{sum(s['tokens'] for s in level)} tokens; {len(admitting)} steps admitted rows "
      f"({sum(s['s'] for s in admitting):.1f} s)")

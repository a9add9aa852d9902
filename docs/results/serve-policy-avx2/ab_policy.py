"""The server's engine loop at 16 and 4 clients, in one process: the mode policy of commit
2eab201 ("after": tokens/s per running row) against that of 323208f ("before": total tokens/s
per batch-size bucket), beside plain decoding; levels interleaved, order alternating per round,
each mode its own policy for the whole run (as a server keeps one). The loop, prompts and
requests are ``../serve-anatomy/anatomy.py``'s; the draft is the one ``distillspec serve`` picks
by default (``--draft auto``), as int8 weights.

    python ab_policy.py [--rounds 3] [--out ab_policy.json]     # from a checkout of 2eab201+
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "serve-anatomy"))

from anatomy import level, setup, summarise  # noqa: E402

from distillspec.decoding.mode_policy import ModePolicy  # noqa: E402

BEFORE = "323208f"


def old_policy_module():
    """``decoding/mode_policy.py`` as it was at ``BEFORE``, imported under another name."""
    source = subprocess.run(["git", "show", f"{BEFORE}:src/distillspec/decoding/mode_policy.py"],
                            cwd=HERE, check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_mode_policy.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_mode_policy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="16,4")
    parser.add_argument("--out", default="ab_policy.json")
    args = parser.parse_args()
    models, speculation, stop, prompts, spec = setup("int8")
    tree = speculation.tree_shape is not None
    policies = {"after": ModePolicy.for_speculation(speculation.gamma, tree),
                "before": old_policy_module().ModePolicy.for_speculation(speculation.gamma, tree)}
    log, rates = [], collections.defaultdict(list)
    levels = [int(c) for c in args.concurrency.split(",")]
    for round_index in range(args.rounds):
        for concurrency in levels:
            order = ["plain", "after", "before"]
            for mode in order if round_index % 2 == 0 else order[::-1]:
                steps = []
                rate = level(models, speculation, stop, prompts,
                             "plain" if mode == "plain" else "auto", concurrency, 32,
                             policies.get(mode), steps)
                for step in steps:
                    step["mode"], step["round"] = mode, round_index + 1
                log += steps
                rates[(mode, concurrency)].append(rate)
                print(f"round {round_index + 1}: {mode} at {concurrency}: {rate:.1f} tok/s",
                      flush=True)
    for concurrency in levels:
        plain = statistics.median(rates[("plain", concurrency)])
        print(concurrency, {m: round(statistics.median(rates[(m, concurrency)]) / plain, 3)
                            for m in ("after", "before")})
    report = {"draft": spec, "draft_quantize": "int8", "rounds": args.rounds,
              **summarise(log, rates), "steps": log}
    Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()

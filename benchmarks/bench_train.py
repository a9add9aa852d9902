"""Training benchmark: a short DistillSpec run on SmolLM2-135M and where its time goes.

Not a test. Builds a plain-text corpus from Python standard-library sources (present on every
machine), distils the target's first N layers on-policy for ``--steps`` steps, and reports
training tokens/s, the share of step time in on-policy generation, target forward and draft
forward/backward, and held-out alpha/tau before and after (from the run's metrics.jsonl).

    python benchmarks/bench_train.py --steps 40 --out docs/results/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path

from distillspec.common.config import to_dict
from distillspec.common.io import atomic_write_json
from distillspec.training.config import DistillConfig
from distillspec.training.loop import distill

STDLIB_FILES = [
    "json/decoder.py",
    "textwrap.py",
    "string.py",
    "bisect.py",
    "heapq.py",
    "fnmatch.py",
    "shlex.py",
    "csv.py",
    "queue.py",
    "calendar.py",
]


def stdlib_corpus(folder: Path) -> Path:
    source = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in STDLIB_FILES:
        shutil.copy(source / name, folder / (name.replace("/", "_") + ".txt"))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--policy", default="draft")
    parser.add_argument("--divergence", default="fkl")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_train.json"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="distillspec-bench-train-"))
    config = DistillConfig(
        target="builtin:smollm2-135m",
        draft_init=f"target-layers:{args.draft_layers}",
        data=str(stdlib_corpus(work / "corpus")),
        policy=args.policy,
        divergence=args.divergence,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=64,
        max_completion_tokens=64,
        lr=3e-4,
        warmup_steps=5,
        eval_every=0,
        save_every=0,
        eval_prompts=16,
        eval_tau_prompts=4,
        eval_max_new_tokens=48,
        held_out=16,
        output_dir=str(work / "run"),
        seed=0,
    )
    final = distill(config)
    records = [
        json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "loss" in r][2:]  # discard the first steps as warm-up
    start = next(r for r in records if r.get("eval") == "start")
    total = sum(r["step_seconds"] for r in steps)
    shares = {
        key: sum(r[f"time_{key}"] for r in steps) / total
        for key in ("generation", "target_forward", "draft_forward_backward")
    }
    report = {
        "command": "python benchmarks/bench_train.py " + " ".join(argv or sys.argv[1:]),
        "config": to_dict(config),
        "median_step_seconds": statistics.median(r["step_seconds"] for r in steps),
        "training_tokens_per_second": sum(r["tokens"] for r in steps) / total,
        "time_share": shares,
        "alpha_before": {k: start[k] for k in start if k.startswith(("alpha", "tau"))},
        "alpha_after": final,
        "train_minutes": total / 60,
    }
    atomic_write_json(args.out, report)
    print(json.dumps({k: report[k] for k in report if k not in ("config",)}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Teacher data on 1 vs 2 ranks and a study on 1 vs 2 workers, side by side, as JSON.

Not a test, and only meaningful on a quiet machine (nothing else on its cores). Each variant is
the real command, timed from start to exit (start-up and model loading included, as a user
waits for them), with the same total number of CPU threads:

* ``datagen``: ``distillspec datagen`` on ``--prompts`` prompts, 1 process with T threads vs
  ``torchrun --nproc_per_node 2`` with T/2 threads each; the two files must be identical.
  Target of issue 24: 2 ranks >= 1.6x faster.
* ``study``: ``distillspec study`` of 8 cells (4 divergences x onpolicy x 2 seeds, a full-vocab
  draft, so no one-off answers, top-k or initial draft: the cells are the work), ``--workers
  1`` with T threads vs ``--workers 2`` (T/2 each). Target: 2 workers <= 0.6x the time.

    python benchmarks/bench_scale.py --out docs/results/scale/scale.json
    python benchmarks/bench_scale.py --target path/to/hf-folder --threads 8 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distillspec.common.io import atomic_write_json
from distillspec.common.runtime import cpu_name

TORCHRUN = Path(sys.executable).with_name("torchrun")
CLI = [sys.executable, "-m", "distillspec"]


def timed(command: list[str], threads: int) -> float:
    """Wall seconds of ``command`` (which must succeed), with OMP_NUM_THREADS = ``threads``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n"
                         f"{result.stderr[-3000:]}")
    return seconds


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bench_datagen(args, work: Path) -> dict:
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic number {i}."}) + "\n"
                               for i in range(args.prompts)))

    def command(out: str, threads: int) -> list[str]:
        return ["-m", "distillspec", "datagen", "--target", args.target, "--data", str(prompts),
                "--out", str(work / out), "--temperature", "0", "--max-new-tokens",
                str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--shard-prompts",
                str(args.shard_prompts), "--device", "cpu", "--dtype", "float32", "--threads",
                str(threads)]

    half = max(1, args.threads // 2)
    one = timed([sys.executable, *command("one.jsonl", args.threads)], args.threads)
    two = timed([str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), *command("two.jsonl", half)], half)
    identical = (work / "one.jsonl").read_bytes() == (work / "two.jsonl").read_bytes()
    return {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "shard_prompts": args.shard_prompts,
            "one_rank_s": one, "two_ranks_s": two, "speedup": one / two,
            "identical_output": identical, "target_speedup": 1.6,
            "target_met": identical and one / two >= 1.6}


def bench_study(args, work: Path) -> dict:
    def command(out: str, workers: int) -> list[str]:
        return [*CLI, "study", "--tasks", "chat=builtin:chat", "--divergences", "fkl,rkl,tvd,jsd",
                "--data-sources", "onpolicy", "--seeds", "0,1", "--minutes", "0", "--steps",
                str(args.steps), "--recipe.target", args.target, "--recipe.draft-init",
                "target-layers:2", "--no-recipe.train-lm-head", "--recipe.save-every", "0", "--gammas", "1,2,3",
                "--workers", str(workers), "--threads", str(args.threads), "--device", "cpu",
                "--dtype", "float32", "--out", str(work / out)]

    one = timed(command("study-1", 1), args.threads)
    two = timed(command("study-2", 2), max(1, args.threads // 2))
    cells = {}
    for name in ("study-1", "study-2"):
        study = json.loads((work / name / "study.json").read_text())
        cells[name] = {r["cell"]: (r["alpha_t0"], r["alpha_t1"]) for r in study["cells"]}
    return {"cells": len(cells["study-1"]), "steps": args.steps, "one_worker_s": one,
            "two_workers_s": two, "ratio": two / one, "same_cells":
            sorted(cells["study-1"]) == sorted(cells["study-2"]),
            "alphas_equal": cells["study-1"] == cells["study-2"], "target_ratio": 0.6,
            "target_met": two / one <= 0.6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="builtin:smollm2-135m")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="total CPU threads of each variant (2 ranks/workers: half each)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-prompts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="training steps per study cell")
    parser.add_argument("--only", choices=("datagen", "study"), default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/results/scale/scale.json"))
    args = parser.parse_args(argv)
    if not TORCHRUN.exists():
        raise SystemExit(f"torchrun is not installed next to {sys.executable}.")
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "threads": args.threads,
              "target": args.target, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
        if args.only in (None, "datagen"):
            result["datagen"] = bench_datagen(args, Path(folder))
            print(json.dumps(result["datagen"]), file=sys.stderr)
        if args.only in (None, "study"):
            result["study"] = bench_study(args, Path(folder))
            print(json.dumps(result["study"]), file=sys.stderr)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

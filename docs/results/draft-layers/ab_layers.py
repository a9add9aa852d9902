"""A/B of which target layers the demo's 3-layer draft copies, at equal training minutes
(issue 20: the alpha plateau). Arms, each a fresh draft with an 8192-token head trained for MIN
minutes on the demo's cached data (the target's greedy answers, top-32 cached), the demo's
recipe otherwise (forward KL, lr 3e-3, batch 8, frozen embeddings), seed 0, target loaded once:
  L012   target-layers:0,1,2  (the demo's draft: the first 3 layers)
  L0129  target-layers:0,1,29 (the first 2 and the last: the head reads features from the layer
         that was trained to feed it)
  L02829 target-layers:0,28,29
All three cost the same per step (3 layers, one head). alpha (T=0, T=1) on
../written-prompts-2/choice99.jsonl (the trainer's eval set) and on
../written-prompts-2/other-eval.jsonl (77 requests written apart).
    DATA=answers.jsonl TOPK=<topk dir> MIN=6 python ab_layers.py L012 L0129 L02829
"""
import os
import sys
from pathlib import Path

from distillspec.common.config import replace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "written-prompts-2"))
from alpha_other import run_cached_ab  # noqa: E402

MINUTES = float(os.environ.get("MIN", 6))
RUNS = Path(os.environ.get("RUNS", "/work/runs/draft-layers"))
ARMS = {"L012": "0,1,2", "L0129": "0,1,29", "L02829": "0,28,29"}


def main(arms):
    run_cached_ab(HERE / "ab_layers.json", MINUTES, arm, arms, draft_init="target-layers:3:vocab=8192")


def arm(base, name):
    """``(name, config, record fields)`` of one arm: the draft copies ARMS[name]'s layers."""
    draft_init = f"target-layers:{ARMS[name]}:vocab=8192"
    config = replace(base, output_dir=str(RUNS / f"run-{name}"), draft_init=draft_init)
    return name, config, {"draft_init": draft_init}


if __name__ == "__main__":
    main(sys.argv[1:])

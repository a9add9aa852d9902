"""A/B: does training the draft's input embeddings lift alpha at equal minutes (issue 20: the
alpha plateau)? The input embedding table (49152 x 576, 28M numbers) is a lookup: training it
adds capacity at no cost to a draft step, only to a training step (its AdamW update). Arms, each
a fresh 2-layer draft with an 8192-token head trained for MIN minutes on the demo's cached data
(the target's greedy and T=1 answers, top-32 cached), the demo's recipe otherwise (forward KL,
lr 3e-3, batch 8), seed 0, the target loaded once:
  FROZEN  train_embeddings false (the demo's recipe until now)
  EMB     train_embeddings true
  EMB_STEPS  train_embeddings true, at FROZEN's step count (2227 steps, the time cap 15 min): is
             a step of it worth more, whatever it costs?
alpha (T=0, T=1) on ../written-prompts-2/choice99.jsonl (the trainer's eval set) and on
../written-prompts-2/other-eval.jsonl (77 requests written apart).
    DATA=answers.jsonl TOPK=<topk dir> MIN=6 python ab_embed.py FROZEN EMB
"""
import os
import sys
from pathlib import Path

from distillspec.common.config import replace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "written-prompts-2"))
from alpha_other import run_cached_ab  # noqa: E402

MINUTES = float(os.environ.get("MIN", 6))
RUNS = Path(os.environ.get("RUNS", "/work/runs/train-embeddings"))
ARMS = {"FROZEN": False, "EMB": True, "EMB_STEPS": True}
STEPS = {"EMB_STEPS": 2227}


def main(arms):
    run_cached_ab(HERE / "ab_embed.json", MINUTES, arm, arms, draft_init="target-layers:2:vocab=8192")


def arm(base, name):
    """``(name, config, record fields)`` of one arm: embeddings trained or frozen."""
    config = replace(base, output_dir=str(RUNS / f"run-{name}"), train_embeddings=ARMS[name])
    if name in STEPS:
        config = replace(config, max_steps=STEPS[name], max_minutes=15.0)
    return name, config, {"train_embeddings": ARMS[name], "max_steps": config.max_steps}


if __name__ == "__main__":
    main(sys.argv[1:])

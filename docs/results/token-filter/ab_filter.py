"""A/B of AdaSPEC's token filter on the demo pair at equal training minutes (issue 20, item 3).

Arms, each a fresh 3-layer draft with an 8192-token head (the demo's AVX2 choice) trained for
MIN minutes on the demo's cached data (the target's greedy answers to its 2385 training prompts,
top-32 cached), the demo's recipe otherwise (lr 3e-3, batch 8, frozen embeddings), seed 0, the
target loaded once:
  C      forward KL on every completion token (the demo's recipe)
  F50    forward KL on the half of each batch's tokens where the draft's divergence exceeds the
         reference's the most (filter_keep 0.5)
  F80    the same, keeping 80 %
  L50    lk (the acceptance loss, -log sum_v min(p_v, q_v)) with the same 50 % filter
  C365   C stopped after 365 steps (F50's count): the filter at equal steps rather than minutes
The reference (REF) is a draft already distilled for this target on the same data (the demo's
12-minute draft); its training time is not in the arms' minutes, see README.md.
alpha (T=0, T=1) on ../written-prompts-2/choice99.jsonl (the trainer's eval set) and on
../written-prompts-2/other-eval.jsonl (77 requests written apart).
    DATA=answers.jsonl TOPK=<topk dir> REF=<draft> MIN=6 python ab_filter.py C F50 F80 L50
"""
import os
import sys
from pathlib import Path

from distillspec.common.config import replace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "written-prompts-2"))
from alpha_other import ab_setup, run_arms  # noqa: E402

MINUTES = float(os.environ.get("MIN", 6))
RUNS = Path(os.environ.get("RUNS", "/work/runs/token-filter"))
ARMS = {
    "C": {},
    "F50": {"filter_keep": 0.5},
    "F80": {"filter_keep": 0.8},
    "L50": {"divergence": "lk", "filter_keep": 0.5},
    "C365": {"max_steps": 365},  # C stopped at F50's step count: the filter per step
}


def main(arms):
    target, tokenizer, base, other = ab_setup(
        MINUTES, draft_init="target-layers:3:vocab=8192", data=os.environ["DATA"],
        teacher_topk_dir=os.environ["TOPK"])
    run_arms(HERE / "ab_filter.json", {"minutes": MINUTES, "reference": os.environ["REF"]},
             (arm(base, name) for name in arms), target, tokenizer, other)


def arm(base, name):
    """``(name, config, record fields)`` of one arm: the filter's arms read the reference."""
    overrides = dict(ARMS[name])
    if overrides.get("filter_keep", 1.0) < 1.0:
        overrides["filter_reference"] = os.environ["REF"]
    config = replace(base, output_dir=str(RUNS / f"run-{name}"), **overrides)
    return name, config, {"overrides": overrides}


if __name__ == "__main__":
    main(sys.argv[1:])

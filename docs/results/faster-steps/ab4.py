"""A/B of cheaper training steps at equal minutes (issues 20 and 22): the demo's recipe on the
data of written-prompts-3's arm E (the demo's v10 data: 2385 prompts x greedy + one T=1 answer,
cached top-32), its 2-layer 8192-token draft, seed 0, 6 training minutes, the target loaded once.

Arms:
  old   the trainer before: AdamW's per-tensor loop, SDPA attention, batches straight from the
        shuffled stream (train_attention sdpa, length_grouping 0, the optimiser patched back)
  fast  fused AdamW, train_attention auto (eager at <= 256 columns on CPU), length_grouping 16

alpha (T=0, T=1) on choice99 and on the 77 requests written apart, as in written-prompts-3.
    ARM=/work/runs/alpha3/E-answers.jsonl TOPK=/work/runs/alpha3/run-E python ab4.py old fast
    (and again with SEED=1)
"""
import json
import os
import sys
from pathlib import Path

import torch

from distillspec.common.config import replace
from distillspec.common.io import atomic_write_json
from distillspec.training import setup

HERE = Path(__file__).resolve().parent
SETS = HERE.parent / "written-prompts-2"
sys.path.insert(0, str(SETS))
from alpha_other import ab_setup, train_arm  # noqa: E402

MINUTES = float(os.environ.get("MIN", 6))
RUNS = Path(os.environ.get("RUNS", "/work/runs/faster-steps"))
SEED = int(os.environ.get("SEED", 0))  # a second seed: SEED=1 (arms saved as old-s1, fast-s1)
FUSED_OPTIMIZER = setup.make_optimizer
ARMS = {
    "old": dict(train_attention="sdpa", length_grouping=0),
    "fast": dict(train_attention="auto", length_grouping=16),
}


def loop_optimizer(trainable, config):
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)


def main(arms):
    target, tokenizer, base, other = ab_setup(
        MINUTES, draft_init="target-layers:2:vocab=8192", data=os.environ["ARM"],
        teacher_topk_dir=os.environ.get("TOPK"))
    path = HERE / "ab4.json"
    report = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    for name in arms:
        setup.make_optimizer = loop_optimizer if name == "old" else FUSED_OPTIMIZER
        key = name if SEED == 0 else f"{name}-s{SEED}"
        config = replace(base, output_dir=str(RUNS / f"run-{key}"), seed=SEED, **ARMS[name])
        report["arms"][key] = {"seed": SEED, **train_arm(config, target, tokenizer, other), **ARMS[name],
                                "optimizer": "loop" if name == "old" else "fused"}
        print(key, json.dumps(report["arms"][key]), flush=True)
        atomic_write_json(path, report)


if __name__ == "__main__":
    main(sys.argv[1:])

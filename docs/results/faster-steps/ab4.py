"""A/B of cheaper training steps at equal minutes (issues 20 and 22): the demo's recipe on the
data of written-prompts-3's arm E (the demo's v10 data: 2385 prompts x greedy + one T=1 answer,
cached top-32), its 2-layer 8192-token draft, seed 0, 6 training minutes, the target loaded once.

Arms:
  old   the trainer before: AdamW's per-tensor loop, SDPA attention, batches straight from the
        shuffled stream (train_attention sdpa, length_grouping 0, the optimiser patched back)
  fast  fused AdamW, train_attention auto (eager at <= 256 columns on CPU), length_grouping 16

alpha (T=0, T=1) on choice99 and on the 77 requests written apart, as in written-prompts-3.
    ARM=/work/runs/alpha3/E-answers.jsonl TOPK=/work/runs/alpha3/run-E python ab4.py old fast
"""
import json
import os
import sys
from pathlib import Path

import torch

from distillspec.common.config import from_dict, replace
from distillspec.common.io import atomic_write_json
from distillspec.models.loading import load_model
from distillspec.tools.configs import DemoConfig
from distillspec.training import setup

HERE = Path(__file__).resolve().parent
SETS = HERE.parent / "written-prompts-2"
sys.path.insert(0, str(SETS))
from alpha_other import alpha_evaluator, train_arm  # noqa: E402

MINUTES = float(os.environ.get("MIN", 6))
RUNS = Path(os.environ.get("RUNS", "/work/runs/faster-steps"))
FUSED_OPTIMIZER = setup.make_optimizer
ARMS = {
    "old": dict(train_attention="sdpa", length_grouping=0),
    "fast": dict(train_attention="auto", length_grouping=16),
}


def loop_optimizer(trainable, config):
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)


def main(arms):
    demo = from_dict(DemoConfig, {})
    target, tokenizer = load_model(demo.distill.target)
    base = replace(demo.distill, draft_init="target-layers:2:vocab=8192", data=os.environ["ARM"],
                   teacher_topk_dir=os.environ.get("TOPK"), max_minutes=MINUTES,
                   max_steps=100000, eval_data=str(SETS / "choice99.jsonl"), eval_prompts=99,
                   eval_tau_prompts=0, eval_max_new_tokens=64, eval_every=0, save_every=0,
                   overwrite=True, resume=False)
    other = alpha_evaluator(target, tokenizer, SETS / "other-eval.jsonl")
    path = HERE / "ab4.json"
    report = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    for name in arms:
        setup.make_optimizer = loop_optimizer if name == "old" else FUSED_OPTIMIZER
        config = replace(base, output_dir=str(RUNS / f"run-{name}"), **ARMS[name])
        report["arms"][name] = {**train_arm(config, target, tokenizer, other), **ARMS[name],
                                "optimizer": "loop" if name == "old" else "fused"}
        print(name, json.dumps(report["arms"][name]), flush=True)
        atomic_write_json(path, report)


if __name__ == "__main__":
    main(sys.argv[1:])

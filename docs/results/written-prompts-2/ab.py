"""A/B of the demo's training data at equal minutes: held-out alpha of the demo's 2-layer draft.

Arms (name -> answers file), 6 training minutes each, the demo's recipe otherwise (DEMO_RECIPE:
fkl on the cached top-32, lr 3e-3, batch 8, 64-token answers, frozen embeddings), seed 0:
  B  the demo's default data: 1024 Magpie prompts + 404 builtin:chat-pool, target's greedy answers
  C  B + the target's greedy answers to the new written requests (new-written.jsonl)
  D  written requests only (404 + new), no Magpie pool
alpha (T=0 and T=1, the trainer's analytic alpha on the target's greedy 64-token answers) on:
  choice99.jsonl   builtin:chat:all minus the demo's report split (first 16 of builtin:chat:train):
                   the split this A/B decides on
  other-eval.jsonl 120 requests written apart, under another brief, trained and chosen on by no one
    python ab.py B C D
"""
import json
import os
import sys
from pathlib import Path

from distillspec.common.config import from_dict, replace
from distillspec.common.io import atomic_write_json
from distillspec.models.loading import load_model
from distillspec.tools.configs import DemoConfig
from distillspec.tools.demo_data import demo_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpha_other import alpha_evaluator, train_arm  # noqa: E402

HERE = Path(__file__).resolve().parent
MINUTES = float(os.environ.get("MIN", 6))


def main(arms):
    demo = from_dict(DemoConfig, {})
    target, tokenizer = load_model(demo.distill.target)
    data = demo_data(demo, target, tokenizer)
    files = {"B": data.answers, "C": HERE / "C-answers.jsonl", "D": HERE / "D-answers.jsonl"}
    base = replace(demo.distill, draft_init="target-layers:2:vocab=8192", max_minutes=MINUTES,
                   max_steps=100000, eval_data=str(HERE / "choice99.jsonl"), eval_prompts=99,
                   eval_tau_prompts=0, eval_max_new_tokens=64, eval_every=0, save_every=0,
                   teacher_topk_dir=str(HERE / "topk"), overwrite=True, resume=False)
    path = HERE / "ab.json"
    report = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    other = alpha_evaluator(target, tokenizer, HERE / "other-eval.jsonl")
    for name in arms:
        config = replace(base, data=str(files[name]), output_dir=str(HERE / f"run-{name}"))
        report["arms"][name] = train_arm(config, target, tokenizer, other)
        print(name, json.dumps(report["arms"][name]), flush=True)
        atomic_write_json(path, report)


if __name__ == "__main__":
    main(sys.argv[1:])

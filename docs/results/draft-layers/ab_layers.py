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
import json
import os
import sys
from pathlib import Path

from distillspec.common.config import replace
from distillspec.common.io import atomic_write_json

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "written-prompts-2"))
from alpha_other import ab_setup, train_arm  # noqa: E402

MINUTES = float(os.environ.get("MIN", 6))
RUNS = Path(os.environ.get("RUNS", "/work/runs/draft-layers"))
ARMS = {"L012": "0,1,2", "L0129": "0,1,29", "L02829": "0,28,29"}


def main(arms):
    target, tokenizer, base, other = ab_setup(
        MINUTES, draft_init="target-layers:3:vocab=8192", data=os.environ["DATA"],
        teacher_topk_dir=os.environ["TOPK"])
    path = HERE / "ab_layers.json"
    report = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    report["minutes"] = MINUTES
    for name in arms:
        draft_init = f"target-layers:{ARMS[name]}:vocab=8192"
        config = replace(base, output_dir=str(RUNS / f"run-{name}"), draft_init=draft_init)
        report["arms"][name] = {"draft_init": draft_init,
                                **train_arm(config, target, tokenizer, other)}
        print(name, json.dumps(report["arms"][name]), flush=True)
        atomic_write_json(path, report)


if __name__ == "__main__":
    main(sys.argv[1:])

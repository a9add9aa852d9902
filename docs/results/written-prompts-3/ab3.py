"""A/B of two more data levers for the demo's draft at equal minutes (issue 20).

Arms (name -> answers file), 6 training minutes each, the demo's recipe otherwise (fkl on the
cached top-32, lr 3e-3, batch 8, 64-token answers, frozen embeddings), its 2-layer 8192-token
draft, seed 0, the target loaded once:
  C  the demo's data (v9): 1024 Magpie prompts + 1361 builtin:chat-pool, target's greedy answers
  E  C + the target's T=1 samples for the same 2385 prompts (a second answer per prompt)
  W  C + the target's greedy answers to 1202 newly written requests (gen3.sh)
  WE E + the same 1202 greedy answers
alpha (T=0 and T=1, the trainer's analytic alpha on the target's greedy 64-token answers) on:
  choice99    ../written-prompts-2/choice99.jsonl: builtin:chat:all minus the demo's report
              split (the split this A/B decides on)
  other-eval  ../written-prompts-2/other-eval.jsonl: 77 requests written apart, trained and
              chosen on by no one
    ARM_C=... ARM_E=... python ab3.py C E      # each arm's answers file; gen3.sh has them all
  E3 E's data with a 3-layer draft (LAYERS=3): capacity at equal minutes
"""
import json
import os
import sys
from pathlib import Path

from distillspec.common.config import replace
from distillspec.common.io import atomic_write_json

HERE = Path(__file__).resolve().parent
SETS = HERE.parent / "written-prompts-2"  # choice99, other-eval and the evaluator
sys.path.insert(0, str(SETS))
from alpha_other import ab_setup, train_arm  # noqa: E402

MINUTES = float(os.environ.get("MIN", 6))
LAYERS = int(os.environ.get("LAYERS", 2))  # the draft's depth (E3: 3)
RUNS = Path(os.environ.get("RUNS", "/work/runs/alpha3"))


def main(arms):
    target, tokenizer, base, other = ab_setup(
        MINUTES, draft_init=f"target-layers:{LAYERS}:vocab=8192",
        teacher_topk_dir=os.environ.get("TOPK"))  # reuse an arm's scores: same data
    path = HERE / "ab3.json"
    report = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    for name in arms:
        config = replace(base, data=os.environ[f"ARM_{name}"], output_dir=str(RUNS / f"run-{name}"))
        report["arms"][name] = train_arm(config, target, tokenizer, other)
        print(name, json.dumps(report["arms"][name]), flush=True)
        atomic_write_json(path, report)


if __name__ == "__main__":
    main(sys.argv[1:])

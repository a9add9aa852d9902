#!/bin/bash
# The garden's table on the Xeon. M's setting is chosen on 8 standard-library prompts
# (another source), every row is measured on HumanEval's 16 held-out tasks (never trained on,
# never chosen on), greedy, 128 tokens, batch 1. L and M run back to back twice (L, M, L, M):
# "÷ L alone" is a cross-run ratio, given for both pairs of runs.
set -e
source /work/main/.venv/bin/activate
text="--task text --data stdlib-prompts.jsonl --num-prompts 8 --max-new-tokens 64 --temperature 0"
date
distillspec eval $text --target builtin:qwen2.5-coder-0.5b --draft draft-x/final \
  --setups target,sd:1,sd:2,sd:3,tree:3:1,tree:4:1,tree:15:2 --out choose-m
best() { python -c "import json,sys; r=json.load(open(sys.argv[1]+'/eval.json'))['setups']; print(max((x for x in r if x['setup']!='target'), key=lambda x: x['tokens_per_s'])['setup'])" "$1"; }
gm=$(best choose-m); echo "chosen for M: $gm"
date
code="--task code --data builtin:humaneval:heldout --max-new-tokens 128 --temperature 0"
distillspec eval $code --target builtin:qwen2.5-coder-1.5b --draft shipped-l/final --setups target,sd:3 --out eval-L
distillspec eval $code --target builtin:qwen2.5-coder-0.5b --draft draft-x/final --compare-draft draft-x-init/final \
  --setups target,$gm --out eval-M
distillspec eval $code --target builtin:qwen2.5-coder-1.5b --setups target --out eval-L2
distillspec eval $code --target builtin:qwen2.5-coder-0.5b --draft draft-x/final --setups target,$gm --out eval-M2
date

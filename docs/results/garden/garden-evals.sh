#!/bin/bash
# The model garden's table. gamma for each pair is chosen on 8 standard-library prompts
# (stdlib-prompts.jsonl, another source), then every row is measured on HumanEval's 16 held-out
# tasks, greedy, 128 new tokens, batch 1. Run from the folder of garden.sh, after it, with
# stdlib-prompts.jsonl copied there from docs/results/real-pair/.
set -e
source /work/main/.venv/bin/activate
text="--task text --data stdlib-prompts.jsonl --num-prompts 8 --max-new-tokens 64 --temperature 0"
date
distillspec eval $text --target builtin:qwen2.5-coder-0.5b --draft draft-m/final --setups target,sd:1,sd:2,sd:3,sd:4 --out choose-m
distillspec eval $text --target builtin:qwen2.5-coder-1.5b --draft shipped-l/final --setups target,sd:2,sd:3,sd:4,sd:5,sd:6 --out choose-l
date
best() { python -c "import json,sys; r=json.load(open(sys.argv[1]+'/eval.json'))['setups']; print(max((x for x in r if x['setup']!='target'), key=lambda x: x['tokens_per_s'])['setup'])" "$1"; }
gm=$(best choose-m); gl=$(best choose-l); echo "chosen: M $gm, L $gl"
code="--task code --data builtin:humaneval:heldout --max-new-tokens 128 --temperature 0"
distillspec eval $code --target builtin:qwen2.5-coder-1.5b --draft shipped-l/final --setups target,$gl --out eval-L
date
distillspec eval $code --target builtin:qwen2.5-coder-0.5b --draft draft-m/final --compare-draft draft-m-init/final \
  --setups target,$gm --out eval-M
date

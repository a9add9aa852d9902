#!/bin/bash
# Model garden, second draft for M. Run from its folder (stdlib-functions.jsonl made by
# stdlib_functions.py; stdlib-prompts.jsonl copied from docs/results/real-pair/).
set -e
source /work/main/.venv/bin/activate
date
distillspec distill --config garden2.yaml                      # top-k scoring, then 12 min
date
text="--task text --data stdlib-prompts.jsonl --num-prompts 8 --max-new-tokens 64 --temperature 0"
M="--target builtin:qwen2.5-coder-0.5b --draft draft-m2/final"
distillspec eval $text $M --setups target,sd:1,sd:2,sd:3,sd:4 --draft-quantize none --out choose-m2 # stopped: see README
distillspec eval $text $M --setups target,sd:1,sd:2,sd:3,sd:4 --draft-quantize int8 --out choose-m2-int8
date

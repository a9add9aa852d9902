#!/bin/bash
# Lossy SD chosen on one split and confirmed on another (issue 21, item 3), from a working folder
# holding shipped-l.yaml and answers-m-t0.jsonl (Qwen2.5-Coder-0.5B's greedy answers to HumanEval's
# 148 training tasks: docs/results/garden/garden.sh makes it; they only count the pruned head's ids).
set -e
distillspec models install qwen2.5-coder
# standard SD's draft: the 0.5B as shipped + a 16384-token pruned head, no training step (1.9 min)
distillspec distill --config shipped-l.yaml
common="--task code --temperature 1 --max-new-tokens 128 --target builtin:qwen2.5-coder-1.5b \
  --draft shipped-l/final --draft-quantize int8"
# 1. the choice split: 24 HumanEval training tasks, one sample each (27 min)
distillspec eval $common --data builtin:humaneval:train --num-prompts 24 --seed 400 \
  --setups sd:5,sd:5:exp=0.9,sd:5:exp=0.7,sd:5:exp=0.5,sd:5:exp=0.3,sd:5:lin=0.5,sd:5:lin=0.3 --out choose
# 2. the report split: the 16 held-out tasks x 4 samples, lossless and the chosen setup only, three
#    runs with new seeds, the order alternating (20 min each)
heldout="--data builtin:humaneval:heldout --samples 4"
distillspec eval $common $heldout --seed 500 --setups sd:5,sd:5:lin=0.5 --out confirm-a
distillspec eval $common $heldout --seed 600 --setups sd:5:lin=0.5,sd:5 --out confirm-b
distillspec eval $common $heldout --seed 700 --setups sd:5,sd:5:lin=0.5 --out confirm-c
python pool.py confirm-a confirm-b confirm-c > pooled.txt

#!/bin/bash
# The target's greedy answers to the new written requests, then arms C and D's data files.
set -e
source /work/main/.venv/bin/activate
cd /work/runs/alpha
date
distillspec datagen --target builtin:smollm2-135m --data new-written.jsonl --out new-answers.jsonl \
  --temperature 0 --max-new-tokens 64 --batch-size 128 --overwrite 2>&1 | tail -2
C=/root/.cache/distillspec/demo-data
cat $C/c52cd78e15ba23f8/answers.jsonl new-answers.jsonl > C-answers.jsonl
cat $C/ba38469f55e94337/answers.jsonl new-answers.jsonl > D-answers.jsonl
wc -l C-answers.jsonl D-answers.jsonl
date
python ab.py B C D
date

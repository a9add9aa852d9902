#!/bin/bash
set -e
source /work/main/.venv/bin/activate
cd /work/runs/alpha   # human-prompts.jsonl: dedupe.py's output (= src/distillspec/data/chat_pool_prompts.jsonl)
date
python prep.py 2>&1 | grep -v "it/s\]" | tail -3
MAGPIE=$(ls -d ~/.cache/distillspec/demo-data/*/answers.jsonl | head -1)
echo "magpie: $MAGPIE ($(wc -l < $MAGPIE))"
date
distillspec datagen --target builtin:smollm2-135m --data human-prompts.jsonl --out human-answers.jsonl \
  --temperature 0 --max-new-tokens 64 --batch-size 128 --overwrite 2>&1 | tail -2
cat "$MAGPIE" human-answers.jsonl > mixed.jsonl
wc -l mixed.jsonl
date
MIN=${MIN:-6}
distillspec distill --config recipe.yaml --data "$MAGPIE" --max-minutes $MIN --output-dir A-magpie --overwrite 2>&1 | grep -v "it/s\]" | tail -4
date
distillspec distill --config recipe.yaml --data mixed.jsonl --max-minutes $MIN --output-dir B-mixed --overwrite 2>&1 | grep -v "it/s\]" | tail -4
date

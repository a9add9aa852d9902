#!/bin/bash
set -e
source /work/main/.venv/bin/activate
date
distillspec datagen --target builtin:qwen2.5-coder-0.5b --data code-prompts.jsonl \
  --out answers-m-code.jsonl --temperature 0 --max-new-tokens 128 --batch-size 16
date
distillspec distill --config garden3.yaml
date

#!/bin/bash
# The garden's drafts on the Xeon (run from this folder after code-prompts.jsonl is made).
set -e
source /work/main/.venv/bin/activate
date
distillspec datagen --target builtin:qwen2.5-coder-0.5b --data code-prompts.jsonl \
  --out answers-m-code.jsonl --temperature 0 --max-new-tokens 128 --batch-size 16
date
distillspec distill --config garden-x.yaml --max-steps 0 --teacher-topk 0 --max-minutes 0 \
  --output-dir draft-x-init                                  # M's draft before distillation
distillspec distill --config garden-x.yaml                   # M's DistillSpec draft, 25 min
distillspec distill --config shipped-l.yaml                  # L + SD's draft (no step)
date

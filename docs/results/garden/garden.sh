#!/bin/bash
# The model garden's drafts. Run from /work/runs/garden.
set -e
source /work/main/.venv/bin/activate
date
# M's greedy answers to HumanEval's 148 training tasks: the distillation data and the pruned heads' ids
distillspec datagen --target builtin:qwen2.5-coder-0.5b --data builtin:humaneval \
  --out answers-m-t0.jsonl --temperature 0 --max-new-tokens 128 --batch-size 16
date
distillspec distill --config shipped-l.yaml                       # L + SD's draft (no step)
distillspec distill --config garden.yaml --max-steps 0 --teacher-topk 0 --max-minutes 0 \
  --output-dir draft-m-init                                        # M's draft before distillation
date
distillspec distill --config garden.yaml                          # M's DistillSpec draft, 10 min
date

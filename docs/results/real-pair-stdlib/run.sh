#!/bin/bash
# The commands that made this folder's figures, in order (run from a working folder holding
# code-prompts.jsonl = docs/results/garden-x's 917 code prompts, and this folder's yaml/jsonl).
set -e
python benchmarks/stdlib_code_prompts.py --count 40 --out stdlib-40.jsonl
head -16 stdlib-40.jsonl > report-stdlib.jsonl      # = docs/results/real-pair/stdlib-prompts.jsonl
sed -n 17,40p stdlib-40.jsonl > choice-stdlib.jsonl
distillspec datagen --target builtin:qwen2.5-coder-1.5b --data code-prompts.jsonl \
  --out answers-l-t1.jsonl --temperature 1 --max-new-tokens 64 --max-prompt-tokens 128 \
  --batch-size 16 --seed 0                                      # 16.2 min
distillspec distill --config shipped.yaml                       # standard SD's draft, no step
distillspec distill --config distill.yaml                       # 9 min top-k + 22 min training
common="--target builtin:qwen2.5-coder-1.5b --draft distilled/final --compare-draft shipped/final --setups target,sd:5"
distillspec eval --task text --data report-stdlib.jsonl --max-new-tokens 64 --temperature 1 $common --out eval-report-t1
distillspec eval --task text --data report-stdlib.jsonl --max-new-tokens 64 --temperature 1 --seed 100 $common --out eval-report-t1-s100
python alpha_pair.py builtin:qwen2.5-coder-1.5b distilled/final shipped/final alpha-pair.json \
  report-stdlib.jsonl choice-stdlib.jsonl builtin:humaneval:heldout
# the variant: lr 1e-4, 15 min, the same top-k (teacher-topk.* copied into topk/ under its
# fingerprint name, teacher_topk_dir: topk)
distillspec distill --config distill-lr1e-4.yaml
python alpha_pair.py builtin:qwen2.5-coder-1.5b distilled-lr1e-4/final shipped/final \
  alpha-pair-lr1e-4.json report-stdlib.jsonl choice-stdlib.jsonl

#!/bin/bash
# Issue 21's greedy >= 2.0x target on the Qwen pair, re-measured with packed linear layers:
# chain gamma 5 and the dynamic tree dyn:16:6:3 (both chosen on 4 stdlib prompts in
# docs/results/bench-qwen-trees/, another source), reported on 8 held-out HumanEval tasks.
set -e
source /work/main/.venv/bin/activate
cd /work/runs/qwen2
date
distillspec models install qwen2.5-coder
date
# The 16k pruned head's ids: the target's greedy answers to the first 48 HumanEval training
# tasks (the bench-qwen-pruned recipe).
python - <<'PY'
import json
from distillspec.training.builtin_data import builtin_dataset_items
items = builtin_dataset_items("builtin:humaneval:train")[:48]
with open("humaneval-train-48.jsonl", "w") as out:
    for item in items:
        out.write(json.dumps({"prompt": item.record["prompt"]}) + "\n")
PY
distillspec datagen --target builtin:qwen2.5-coder-1.5b --data humaneval-train-48.jsonl \
    --out answers.jsonl --temperature 0 --max-new-tokens 64 --batch-size 16 2>&1 | grep -v "it/s\]" | tail -3
date
distillspec distill --target builtin:qwen2.5-coder-1.5b --draft-init builtin:qwen2.5-coder-0.5b:vocab=16384 \
    --data answers.jsonl --eval-data builtin:humaneval:heldout --policy fixed \
    --teacher-topk 0 --max-steps 0 --eval-prompts 3 --eval-tau-prompts 0 --eval-max-new-tokens 40 --output-dir qwen-pruned 2>&1 | grep -v "it/s\]" | tail -3
date
distillspec bench --target builtin:qwen2.5-coder-1.5b --draft qwen-pruned/final \
    --prompts builtin:humaneval:heldout --num-prompts 8 --gammas 5 --trees dyn:16:6:3 \
    --temperatures 0 --batch-sizes 1 --max-new-tokens 64 --repeats 3 --out bench-he8 2>&1 | grep -v "it/s\]" | tail -40
date

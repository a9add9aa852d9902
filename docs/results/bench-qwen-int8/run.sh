#!/bin/bash
# Issue 21's greedy >= 2.0x target with an int8 draft (--draft-quantize int8): the same command
# as docs/results/bench-qwen-packed/ (the tree dyn:16:6:3 chosen on stdlib prompts; gamma 5
# earlier, on 3 of these 8 tasks), the same draft (the 0.5B as shipped + 16k pruned head: standard
# SD), its weights stored as int8. Run in the folder ../bench-qwen-packed/run.sh made.
set -e
source /work/main/.venv/bin/activate
cd /work/runs/qwen2
date
distillspec bench --target builtin:qwen2.5-coder-1.5b --draft qwen-pruned/final \
    --draft-quantize int8 \
    --prompts builtin:humaneval:heldout --num-prompts 8 --gammas 5 --trees dyn:16:6:3 \
    --temperatures 0 --batch-sizes 1 --max-new-tokens 64 --repeats 3 --out bench-he8-int8
date

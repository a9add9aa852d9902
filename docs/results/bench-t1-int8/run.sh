#!/bin/bash
# Issue 22's T = 1 target with the int8 draft: bench-t1-wor's command with --draft-quantize int8,
# then the same command with the bf16 draft, back to back (both reported, decided beforehand).
set -e
source /work/main/.venv/bin/activate
cd /work/runs/t1-int8   # any empty folder
common="--draft /work/runs/demo-v11/run/final --num-prompts 4 --gammas 1,2 --trees 4:1,15:2,dyn:6:2:3 --temperatures 1 --batch-sizes 1 --max-new-tokens 48 --repeats 3"
date
distillspec bench $common --draft-quantize int8 --out int8 2>&1 | grep -v "it/s\]"
date
distillspec bench $common --out bf16 2>&1 | grep -v "it/s\]"
date

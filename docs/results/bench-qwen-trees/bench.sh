#!/bin/bash
# Issue 21: the Qwen pair, greedy, batch 1, chains against trees, compiled steps where faster.
# Choose on 4 stdlib prompts (another source), report the chosen tree and chain on 8 held-out
# HumanEval tasks.
set -e
source /work/main/.venv/bin/activate
cd /work/runs/trees   # the run folder; docs/results/bench-qwen-trees holds its choose/ output
DRAFT=/work/runs/garden/shipped-l/final   # Qwen2.5-Coder-0.5B as shipped + 16k pruned head
common="--target builtin:qwen2.5-coder-1.5b --draft $DRAFT --temperatures 0 --batch-sizes 1 --max-new-tokens 64 --repeats 1"
date
distillspec bench $common --prompts /work/runs/garden/stdlib-prompts.jsonl --num-prompts 4 \
  --gammas 4,5,6 --trees 10:5,16:6,dyn:12:6:2,dyn:16:6:3 --out choose 2>&1 | grep -v "it/s\]" | tail -30
date

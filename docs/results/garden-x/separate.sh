#!/bin/bash
# L alone and M (+ draft) in separate processes, alternating L, M, L, M: 8 held-out tasks, 64 tokens.
set -e
P=/work/main/docs/results/garden-x/one_process.py
for i in 1 2; do
  /work/main/.venv/bin/python $P draft-x/final sep-L$i.json 8 64 1 L 2>&1 | grep -v Loading
  /work/main/.venv/bin/python $P draft-x/final sep-M$i.json 8 64 1 M 2>&1 | grep -v Loading
done

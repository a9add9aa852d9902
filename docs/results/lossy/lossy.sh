#!/bin/bash
# Lossy SD curves on the real pair (issue 21, item 3): f_lin, f_sq, f_exp x 5 epsilons, the distilled
# draft and the shipped one side by side (--compare-draft), T=1, 16 held-out HumanEval tasks, batch 1.
set -e
source /work/main/.venv/bin/activate
cd /work/runs/qwen
setups=target,sd:5
for f in lin sq exp; do for e in 0.9 0.7 0.5 0.3 0.1; do setups=$setups,sd:5:$f=$e; done; done
date
distillspec eval --task code --data builtin:humaneval:heldout --temperature 1 --max-new-tokens 128 --seed 200 \
  --target builtin:qwen2.5-coder-1.5b --draft distill/final --compare-draft shipped/final --setups $setups --out eval-lossy
date

#!/usr/bin/env bash
# A/B of the sampled tree rule's cost: the code before (BASE_SRC, a checkout's src/) against
# this one (NEW_SRC), alternating fresh processes, nothing else running.
#   BASE_SRC=/tmp/base/src NEW_SRC=$PWD/src DRAFT=runs/demo/run/final ./ab.sh OUT_DIR
# 1. phases.py (../t1-overheads/) with tree 15:2, eager, batch 1: ms per phase, T = 0 and 1;
# 2. other_speed.py (../other-source-speed/) at T = 1 on the 24 prompts written apart, tree
#    15:2 (the demo's saved setting), 3 rounds: SD ÷ the target alone.
set -euo pipefail
out=${1:?output folder}
here=$(cd "$(dirname "$0")" && pwd)
results=$(dirname "$here")
mkdir -p "$out"
for round in 1 2; do
  for arm in base new; do
    src=$BASE_SRC; [ "$arm" = new ] && src=$NEW_SRC
    PYTHONPATH=$src python "$results/t1-overheads/phases.py" off 1 15:2 2>/dev/null \
      | grep '^T=' > "$out/phases-$arm-$round.txt"
  done
done
for arm in base new; do
  src=$BASE_SRC; [ "$arm" = new ] && src=$NEW_SRC
  PYTHONPATH=$src python "$results/other-source-speed/other_speed.py" "$DRAFT" \
    "$results/written-prompts-2/other-eval.jsonl" "$out/speed-$arm.json" 24 3 1 2>/dev/null \
    | grep '^T=' > "$out/speed-$arm.txt"
done

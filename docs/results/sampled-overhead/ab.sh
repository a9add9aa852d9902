#!/bin/bash
# One version against another, alternating processes (A B B A A B): BASE_SRC and NEW_SRC are
# checkouts' src/ folders (e.g. `git worktree add /tmp/base <commit>`), DRAFT the draft folder.
# Usage: BASE_SRC=/tmp/base/src NEW_SRC=$PWD/src DRAFT=/work/runs/demo-gqa/run/final ./ab.sh 1.0 ab_t1.txt
T=${1:-1.0}; out=${2:-ab.txt}; : > "$out"
here=$(dirname "$0")
for arm in base new new base base new; do
  if [ $arm = base ]; then src=$BASE_SRC; else src=$NEW_SRC; fi
  line=$(PYTHONPATH=$src python "$here/phase.py" "$DRAFT" 4:1 "$T" 2>&1 | grep "T=" | tr '\n' ' ')
  echo "$arm $line" | tee -a "$out"
done

#!/bin/bash
# A/B: the mode policy skips the step that catches the draft up (new) vs d7203fa (base), alternating
cd /work/main
for r in 1 2; do
  .venv/bin/distillspec bench-serve --prompts builtin:chat:train --out /work/runs/catchup/new-$r > /work/runs/catchup/new-$r.log 2>&1
  PYTHONPATH=/tmp/base/src .venv/bin/distillspec bench-serve --prompts builtin:chat:train --out /work/runs/catchup/base-$r > /work/runs/catchup/base-$r.log 2>&1
done
echo done > /work/runs/catchup/DONE

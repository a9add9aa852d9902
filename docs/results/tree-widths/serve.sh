#!/bin/bash
# bench-serve A/B: the same draft with its saved setting chain gamma 1 (demo-int8, the demo's
# sweep before tree 3:1) against tree 3:1 (demo-w4, re-measured with the new sweep), alternating.
cd /work/main
for r in 1 2; do
  for arm in w4 int8; do
    .venv/bin/distillspec bench-serve --prompts builtin:chat:train --draft /work/runs/demo-$arm/run/final \
      --out /work/runs/w4serve/$arm-$r > /work/runs/w4serve/$arm-$r.log 2>&1
  done
done
echo done > /work/runs/w4serve/DONE

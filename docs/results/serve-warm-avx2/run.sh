#!/bin/bash
# A/B: kernel choices warmed at server start and capped (new) vs HEAD bf44fbd (base), alternating
cd /work/main
for r in 1 2; do
  .venv/bin/distillspec bench-serve --prompts builtin:chat:train --out /work/runs/warm/new-$r > /work/runs/warm/new-$r.log 2>&1
  PYTHONPATH=/tmp/base/src .venv/bin/distillspec bench-serve --prompts builtin:chat:train --out /work/runs/warm/base-$r > /work/runs/warm/base-$r.log 2>&1
done
echo done > /work/runs/warm/DONE

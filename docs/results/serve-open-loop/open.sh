#!/bin/bash
# Open-loop bench-serve at three offered rates, at most 16 in flight, one run per rate.
for rate in 1.0 2.8 3.6; do
  .venv/bin/distillspec bench-serve --concurrency 16 --num-requests 64 --rounds 3 \
    --prompts builtin:chat:train --request-rate $rate --out /work/runs/bs-open-$rate
done

#!/bin/bash
# bench-serve A/B of the working tree (new) against a base commit checked out at /tmp/base
# (`git worktree add -f /tmp/base <commit>`), alternating new/base, twice; OUT holds
# new-1, base-1, new-2, base-2 (bench-serve.{json,md,png}) and their logs.
#   docs/results/serve-ab.sh OUT
set -e
out=$1
cd "$(dirname "$0")/../.."
mkdir -p "$out"
for r in 1 2; do
  .venv/bin/distillspec bench-serve --prompts builtin:chat:train --out "$out/new-$r" > "$out/new-$r.log" 2>&1
  PYTHONPATH=/tmp/base/src .venv/bin/distillspec bench-serve --prompts builtin:chat:train --out "$out/base-$r" > "$out/base-$r.log" 2>&1
done
echo done > "$out/DONE"

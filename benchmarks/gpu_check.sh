#!/usr/bin/env bash
# The GPU checks, in one script for a CUDA machine with this repository installed
# (`pip install -e .[dev]`, the built-in models installed or installable from PyPI).
#
#   benchmarks/gpu_check.sh [OUT]        # OUT (default gpu-check/) gets one log per check,
#                                        # the benches' JSON and summary.txt
#
# 1. cuda-tests: the lossless tests on CUDA (pytest -m cuda: greedy chain and trees equal the
#    target's greedy decoding in float32, the acceptance rule and sampled SD follow the target's
#    distribution, compiled steps equal eager).
# 2. bench-smollm2: the default pair in bf16 against transformers' plain (eager and compiled)
#    and assisted generation, chains and trees, T = 0 and 1, batch 1 and 4.
# 3. bench-qwen: the Qwen2.5-Coder 1.5B/0.5B pair, the same bench (installs it first; needs
#    PyPI, so it fails on a machine without network access unless installed before).
# 4. fsdp-distill: 20 steps of sharded (FSDP2) distillation on every GPU (torchrun), bf16.
# Each check runs even when an earlier one failed; the exit status is 1 if any failed.
# Not in it yet: serving the exported draft with vLLM and comparing vLLM's acceptance with ours.
set -u
out=${1:-gpu-check}
py=${PYTHON:-python}
mkdir -p "$out"
: >"$out/summary.txt"
failed=0

check() {  # check NAME COMMAND...: run it, log to OUT/NAME.log, record ok/FAILED and seconds
    local name=$1 start result
    shift
    start=$(date +%s)
    echo "== $name: $*"
    if "$@" >"$out/$name.log" 2>&1; then result=ok; else result="FAILED (exit $?)"; failed=1; fi
    echo "$name: $result in $(($(date +%s) - start)) s" | tee -a "$out/summary.txt"
}

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check." >&2
    exit 2
fi
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
{ nvidia-smi; "$py" -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } \
    >"$out/machine.txt" 2>&1

check cuda-tests "$py" -m pytest -q -m cuda tests
check bench-smollm2 "$py" -m distillspec bench --device cuda --dtype bfloat16 \
    --draft target-layers:4 --gammas 1,2,4 --trees 4:1,15:2 --temperatures 0,1 \
    --batch-sizes 1,4 --num-prompts 8 --repeats 3 --compile auto --out "$out/bench-smollm2"
check bench-qwen bash -c "'$py' -m distillspec models install qwen2.5-coder && \
    '$py' -m distillspec bench --device cuda --dtype bfloat16 \
    --target builtin:qwen2.5-coder-1.5b --draft builtin:qwen2.5-coder-0.5b --prompts builtin:humaneval:heldout \
    --gammas 2,4,6 --temperatures 0,1 --batch-sizes 1,4 --num-prompts 8 --repeats 3 \
    --out '$out/bench-qwen'"
check fsdp-distill "$py" -m torch.distributed.run --nproc_per_node "$gpus" -m distillspec distill \
    --target builtin:smollm2-135m --draft-init target-layers:4 --data builtin:chat \
    --policy fixed --divergence fkl --sharding fsdp --max-steps 20 --batch-size 8 \
    --eval-every 10 --save-every 10 --device cuda --bf16 on --output-dir "$out/fsdp-distill" \
    --overwrite

cat "$out/summary.txt"
exit $failed

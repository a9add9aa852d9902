#!/usr/bin/env bash
# lm-evaluation-harness on the same two local tasks twice: through `distillspec serve` with
# speculative decoding on (model local-completions), then on transformers directly (model hf),
# same weights, same dtype; then a document-by-document comparison.
#
#   docs/results/lm-eval/run.sh [float32|bfloat16] [OUT]      (default: float32 runs/lm-eval)
#
# Offline: no model hub, no dataset hub (the tasks read docs/results/lm-eval/*.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../../.."
dtype=${1:-float32}
out=${2:-runs/lm-eval}/$dtype
port=${PORT:-8123}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_DATASETS_CACHE="$out/hf-datasets"
py=.venv/bin/python
tasks=distillspec_mc,distillspec_gen
# The default target's safetensors folder (converted from the built-in GGUF once, then cached):
# the server and transformers load the same files.
target=$($py -c "from distillspec.models.loading import resolve_model_path as r; print(r('builtin:smollm2-135m'))")
echo "target: $target" | tee "$out/times.txt"

$py -m distillspec serve --target "$target" --draft runs/demo/run/final --gamma 3 \
  --dtype "$dtype" --port "$port" --model-name smollm2 >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
  kill -0 $server || { cat "$out/server.log"; exit 1; }
  sleep 2
done

start=$(date +%s)
.venv/bin/lm_eval --model local-completions \
  --model_args "model=smollm2,base_url=http://127.0.0.1:$port/v1/completions,tokenizer=$target,tokenizer_backend=huggingface,num_concurrent=1,max_retries=1" \
  --tasks $tasks --include_path docs/results/lm-eval --batch_size 8 \
  --log_samples --output_path "$out/server"
echo "server (SD on, $dtype): $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^distillspec_spec_decode_num_(draft|accepted|emitted)_tokens_total' \
  | tee "$out/acceptance.txt"
kill $server
wait $server || true

start=$(date +%s)
# softmax_dtype=float32: the server takes log_softmax in float32 whatever the model's dtype;
# lm-eval's hf model does so in the model's dtype unless told (matters in bfloat16 only).
.venv/bin/lm_eval --model hf \
  --model_args "pretrained=$target,dtype=$dtype,softmax_dtype=float32" \
  --device cpu --tasks $tasks --include_path docs/results/lm-eval --batch_size 1 \
  --log_samples --output_path "$out/hf"
echo "hf ($dtype): $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"

$py docs/results/lm-eval/compare.py "$out/server" "$out/hf" --json "$out/compare.json" \
  | tee "$out/compare.md"

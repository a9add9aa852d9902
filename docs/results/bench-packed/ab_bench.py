"""Packed linears on/off, side by side in one process: ours plain and SD (compiled steps, as the
bench's auto chose) against transformers' static-cache + torch.compile plain decoding.

python ab_bench.py TEMPERATURE ROUNDS OUT.json [DRAFT]   (DRAFT: runs/demo/run/final)"""
import json
import os
import statistics
import sys

from distillspec.common.runtime import cpu_name
from distillspec.decoding import packed_linear
from distillspec.decoding.kv_cache import compile_steps
from distillspec.decoding.measure import SpeedProbe
from distillspec.decoding.timing import timed
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.tools.bench import HFRunner, load_prompts_for_bench
from distillspec.tools.configs import BenchConfig

temperature, rounds, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
target, tok = load_model("builtin:smollm2-135m")
draft_path = sys.argv[4] if len(sys.argv) > 4 else "runs/demo/run/final"
draft, _ = load_model(draft_path)
config = BenchConfig(num_prompts=4)
prompts = load_prompts_for_bench(config, tok)
eos, pad = eos_token_ids(target, tok), pad_token_id(tok)
compile_steps(target)
compile_steps(draft)
probe = SpeedProbe(target, prompts, max_new_tokens=48, batch_size=1, temperature=temperature,
                   eos_token_id=eos, pad_id=pad, seed=0)
hf = HFRunner(target, None, probe, temperature, 48, eos, pad, 0)

def packing(on):
    os.environ[packed_linear.ENV_SWITCH] = "1" if on else "0"
    packed_linear._swaps.clear()

def count(results):
    return sum(len(s) for r in results for s in r.sequences)

def arm(on, fn):
    def run():
        packing(on)
        return fn()
    return run

arms = {"hf_static_compiled": hf.static_compiled}
for on in (False, True):
    tag = "packed" if on else "unpacked"
    arms[f"ours_plain_{tag}"] = arm(on, lambda: count(probe.plain()))
    arms[f"ours_sd_g1_{tag}"] = arm(on, lambda: count(probe.speculative(draft, 1)))
    arms[f"ours_sd_tree4:1_{tag}"] = arm(on, lambda: count(probe.speculative(draft, 1, tree="4:1")))
for name, fn in arms.items():  # warm-up: every graph compiled before timing
    fn()
    print("warm", name, flush=True)
rates = {k: [] for k in arms}
for r in range(rounds):
    for name, fn in arms.items():
        wall, tokens = timed(fn)
        rates[name].append(tokens / wall)
    print("round", r, {k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
median = {k: statistics.median(v) for k, v in rates.items()}
hf_rate = median["hf_static_compiled"]
report = {"command": "python " + " ".join(sys.argv), "cpu": cpu_name(), "dtype": str(target.dtype),
          "temperature": temperature, "prompts": "builtin:chat:heldout, first 4", "max_new_tokens": 48,
          "draft": draft_path, "rates_tok_s": rates, "median_tok_s": median,
          "over_hf_static": {k: v / hf_rate for k, v in median.items()},
          "packed_over_unpacked": {k.replace("_unpacked", ""): median[k.replace("unpacked", "packed")] / v
                                   for k, v in median.items() if k.endswith("_unpacked")}}
with open(out, "w") as handle:
    json.dump(report, handle, indent=1)
print(json.dumps({k: report[k] for k in ("median_tok_s", "over_hf_static", "packed_over_unpacked")}, indent=1))

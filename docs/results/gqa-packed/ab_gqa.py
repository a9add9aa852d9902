"""Packed grouped-query attention on/off, side by side in one process: ours plain and SD
against transformers' static-cache + torch.compile plain decoding, on steps compiled or eager.

python ab_gqa.py TEMPERATURE ROUNDS OUT.json DRAFT COMPILE   (COMPILE: on | off)

Arms "gqa": every call takes ``enable_gqa`` (``PACK_SINGLE_QUERY = False``, the code before
this change); "packed": one-query calls in bf16 pack the query heads into rows. Every arm is warmed
up first, then ROUNDS interleaved rounds (every other one in reverse order); medians of tokens/s."""
import json
import statistics
import sys

import torch

from distillspec.common.runtime import cpu_name
from distillspec.decoding import attention
from distillspec.decoding.kv_cache import compile_steps
from distillspec.decoding.measure import SpeedProbe
from distillspec.decoding.timing import timed
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.models.quantize import quantize_draft
from distillspec.tools.bench import HFRunner, load_prompts_for_bench
from distillspec.tools.configs import BenchConfig

temperature, rounds, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
draft_path, compiled = sys.argv[4], sys.argv[5] == "on"
quantize = sys.argv[6] if len(sys.argv) > 6 else "none"
torch._dynamo.config.recompile_limit = 256  # both variants' graphs stay compiled
target, tok = load_model("builtin:smollm2-135m")
draft, _ = load_model(draft_path, device=target.device, dtype=target.dtype)
draft = quantize_draft(draft, quantize) if quantize != "none" else draft
prompts = load_prompts_for_bench(BenchConfig(num_prompts=4), tok)
eos, pad = eos_token_ids(target, tok), pad_token_id(tok)
if compiled:
    compile_steps(target)
    compile_steps(draft)
probe = SpeedProbe(target, prompts, max_new_tokens=48, batch_size=1, temperature=temperature,
                   eos_token_id=eos, pad_id=pad, seed=0)
hf = HFRunner(target, None, probe, temperature, 48, eos, pad, 0)


def count(results):
    return sum(len(s) for r in results for s in r.sequences)


def arm(packed, fn):
    def run():
        attention.PACK_SINGLE_QUERY = packed
        return fn()
    return run


arms = {"hf_static_compiled": hf.static_compiled}
for packed in (False, True):
    tag = "packed" if packed else "gqa"
    arms[f"ours_plain_{tag}"] = arm(packed, lambda: count(probe.plain()))
    arms[f"ours_sd_g1_{tag}"] = arm(packed, lambda: count(probe.speculative(draft, 1)))
    for tree in ("3:1", "4:1"):
        arms[f"ours_sd_tree{tree}_{tag}"] = arm(
            packed, lambda tree=tree: count(probe.speculative(draft, 1, tree=tree)))
for name, fn in arms.items():  # warm-up: every graph compiled before timing
    fn()
    print("warm", name, flush=True)
rates = {k: [] for k in arms}
for r in range(rounds):
    order = list(arms.items())
    for name, fn in (order if r % 2 == 0 else order[::-1]):  # odd rounds in reverse: no slot bias
        wall, tokens = timed(fn)
        rates[name].append(tokens / wall)
    print("round", r, {k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
median = {k: statistics.median(v) for k, v in rates.items()}
hf_rate = median["hf_static_compiled"]
report = {"command": "python " + " ".join(sys.argv), "cpu": cpu_name(),
          "capability": torch.backends.cpu.get_cpu_capability(), "dtype": str(target.dtype),
          "temperature": temperature, "compiled_steps": compiled, "draft_quantize": quantize,
          "prompts": "builtin:chat:heldout, first 4", "max_new_tokens": 48,
          "draft": draft_path, "rates_tok_s": rates, "median_tok_s": median,
          "over_hf_static": {k: v / hf_rate for k, v in median.items()},
          "packed_over_gqa": {k.replace("_gqa", ""): median[k.replace("_gqa", "_packed")] / v
                              for k, v in median.items() if k.endswith("_gqa")}}
with open(out, "w") as handle:
    json.dump(report, handle, indent=1)
print(json.dumps({k: report[k] for k in ("median_tok_s", "over_hf_static", "packed_over_gqa")},
                 indent=1))

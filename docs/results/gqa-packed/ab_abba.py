"""A closer look at one arm pair: our plain decoding and SD tree 3:1, one-query calls packed
against enable_gqa, ABBA-ordered rounds (gqa, packed, packed, gqa, ...), one process.

python ab_abba.py ROUNDS OUT.json DRAFT COMPILE   (COMPILE: on | off)"""
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
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.tools.configs import BenchConfig

rounds, out, draft_path, compiled = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "on"
torch._dynamo.config.recompile_limit = 256
target, tok = load_model("builtin:smollm2-135m")
draft, _ = load_model(draft_path, device=target.device, dtype=target.dtype)
prompts = load_prompts_for_bench(BenchConfig(num_prompts=4), tok)
if compiled:
    compile_steps(target)
    compile_steps(draft)
probe = SpeedProbe(target, prompts, max_new_tokens=48, batch_size=1, temperature=0.0,
                   eos_token_id=eos_token_ids(target, tok), pad_id=pad_token_id(tok), seed=0)
runs = {"plain": lambda: probe.plain(), "sd_tree3:1": lambda: probe.speculative(draft, 1, tree="3:1")}
rates = {f"{name}_{tag}": [] for name in runs for tag in ("gqa", "packed")}
for round_ in range(rounds + 1):  # round 0 warms up
    tags = ("gqa", "packed") if round_ % 2 else ("packed", "gqa")
    for name, fn in runs.items():
        for tag in tags:
            attention.PACK_SINGLE_QUERY = tag == "packed"
            wall, results = timed(fn)
            if round_:
                rates[f"{name}_{tag}"].append(sum(len(s) for r in results for s in r.sequences) / wall)
    print("round", round_, {k: round(v[-1], 1) for k, v in rates.items() if v}, flush=True)
median = {k: statistics.median(v) for k, v in rates.items()}
ratio = {name: median[f"{name}_packed"] / median[f"{name}_gqa"] for name in runs}
paired = {name: statistics.median(p / g for p, g in zip(rates[f"{name}_packed"], rates[f"{name}_gqa"]))
          for name in runs}
with open(out, "w") as handle:
    json.dump({"command": "python " + " ".join(sys.argv), "cpu": cpu_name(),
               "capability": torch.backends.cpu.get_cpu_capability(), "dtype": str(target.dtype),
               "compiled_steps": compiled, "draft": draft_path, "rates_tok_s": rates,
               "median_tok_s": median, "packed_over_gqa": ratio,
               "packed_over_gqa_paired_median": paired}, handle, indent=1)
print(json.dumps({"median": median, "ratio": ratio, "paired": paired}, indent=1))

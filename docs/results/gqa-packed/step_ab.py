"""One decoding step, packed grouped-query attention against enable_gqa, through the cost
model's engine calls (``measure_cost_model``: a one-token target step, k-token verifies, a
draft step), after 96 and 384 context tokens, eager and compiled, rounds interleaved.

python step_ab.py DRAFT ROUNDS OUT.json [DTYPE]   (DTYPE: auto, the default, or float32)"""
import json
import statistics
import sys

import torch

from distillspec.common.runtime import cpu_name
from distillspec.decoding import attention
from distillspec.decoding.kv_cache import compile_steps
from distillspec.decoding.measure import measure_cost_model
from distillspec.models.loading import load_model

draft_path, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch._dynamo.config.recompile_limit = 256
dtype = sys.argv[4] if len(sys.argv) > 4 else "auto"
target, _ = load_model("builtin:smollm2-135m", dtype=dtype)
draft, _ = load_model(draft_path, device=target.device, dtype=target.dtype)
results: dict[str, list[dict]] = {}
for compiled in (False, True):
    compile_steps(target, compiled)
    compile_steps(draft, compiled)
    for round_ in range(rounds + 1):  # round 0 warms up (and compiles)
        for context in (96, 384):
            for packed in (False, True):
                attention.PACK_SINGLE_QUERY = packed
                model = measure_cost_model(target, draft, context_tokens=context, max_verify=5,
                                           repeats=5)
                key = f"{'compiled' if compiled else 'eager'}_ctx{context}_{'packed' if packed else 'gqa'}"
                if round_:
                    results.setdefault(key, []).append(
                        {"target_ms": 1000 * model.target_step_s,
                         "draft_ms": 1000 * model.draft_step_s,
                         **{f"verify{k}_ms": 1000 * s for k, s in model.verify_s.items()}})
        print("round", round_, flush=True)
median = {key: {name: statistics.median(r[name] for r in runs) for name in runs[0]}
          for key, runs in results.items()}
for key, row in median.items():
    print(key, " ".join(f"{k} {v:.2f}" for k, v in row.items()))
with open(out, "w") as handle:
    json.dump({"command": "python " + " ".join(sys.argv), "cpu": cpu_name(),
               "capability": torch.backends.cpu.get_cpu_capability(),
               "dtype": str(target.dtype), "draft": draft_path, "rounds": results,
               "median_ms": median}, handle, indent=1)

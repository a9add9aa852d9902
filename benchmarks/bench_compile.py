"""Our engine's decoding steps, eager vs compiled (``--compile``), per dtype, in one run.

Not a test. For SmolLM2-135M (the target) and a draft of its first N layers with a pruned
head, in each ``--dtypes`` entry: ``decoding.measure.compare_step_paths`` (the first compiled
calls timed as compile time, then rounds of the eager and the compiled cost model back to back,
medians): the verify curve (a k-token target call, k = 1..``--max-verify``), V(k) = that ÷ a
one-token step, the draft step, and the one-token target step ÷ the weight-read floor
(parameter bytes ÷ measured copy bandwidth). Also transformers' own ``StaticCache`` one-token
step under ``torch.compile`` at batch 1 for reference (what transformers' compiled path costs).

    python benchmarks/bench_compile.py --out docs/results/compile.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_draft_cost import copy_bandwidth
from transformers import StaticCache

from distillspec.common.io import atomic_write_json, atomic_write_text
from distillspec.common.runtime import cpu_name
from distillspec.decoding.measure import compare_step_paths
from distillspec.models.drafts import truncate_layers
from distillspec.models.loading import load_model
from distillspec.models.pruned_head import prune_head


def hf_static_compiled_step(model, context: int, repeats: int) -> dict:
    """transformers' StaticCache one-token step, compiled: (first call s, median step ms)."""
    cache = StaticCache(config=model.config, max_cache_len=context + repeats + 8)
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    with torch.inference_mode():
        model(input_ids=prompt, cache=cache, use_cache=True,
              cache_position=torch.arange(context))

        def forward(input_ids, cache_position):
            return model(input_ids=input_ids, cache=cache, use_cache=True,
                         cache_position=cache_position, logits_to_keep=1).logits

        compiled = torch.compile(forward, dynamic=False)
        times = []
        for index in range(repeats + 3):
            start = time.perf_counter()
            compiled(prompt[:, -1:], torch.tensor([context + index]))
            times.append(time.perf_counter() - start)
    return {"first_call_s": times[0], "step_ms": statistics.median(times[3:]) * 1e3}


def measure_dtype(dtype: str, args, bandwidth: float) -> dict:
    target, _ = load_model("builtin:smollm2-135m", device="cpu", dtype=dtype)
    vocab = target.get_input_embeddings().weight.shape[0]
    draft = prune_head(truncate_layers(target, args.draft_layers),
                       torch.arange(min(args.draft_vocab, vocab)))
    paths, _ = compare_step_paths(target, draft, max_verify=args.max_verify,
                                  repeats=args.repeats, rounds=args.rounds)
    weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    floor_ms = weight_bytes / bandwidth * 1e3
    target_path = next(p for p in paths if p.role == "target")
    result = {"dtype": str(target.dtype), "paths": [p.to_dict() for p in paths],
              "weight_floor_ms": floor_ms}
    for name, times in (("eager", target_path.eager_s), ("compiled", target_path.compiled_s)):
        result[f"{name}_verify_curve"] = {k: times[k] / times[1] for k in sorted(times)}
        result[f"{name}_step_over_floor"] = times[1] * 1e3 / floor_ms
    result["hf_static_compiled"] = hf_static_compiled_step(target, 96, args.repeats)
    print({k: v for k, v in result.items() if k != "paths"}, flush=True)
    return result


def markdown(report: dict) -> str:
    lines = ["| dtype | path | target step ms | V(2) | V(3) | V(4) | V(5) | draft step ms "
             "| step ÷ weight floor |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        target, draft = row["paths"]
        for name in ("eager", "compiled"):
            curve = row[f"{name}_verify_curve"]
            cells = " | ".join(f"{curve.get(k, float('nan')):.2f}" for k in (2, 3, 4, 5))
            lines.append(f"| {row['dtype']} | {name} | {target[f'{name}_ms'][1]:.1f} | {cells} "
                         f"| {draft[f'{name}_ms'][1]:.1f} | {row[f'{name}_step_over_floor']:.2f} |")
        hf = row["hf_static_compiled"]
        lines.append(f"| {row['dtype']} | transformers StaticCache, compiled | {hf['step_ms']:.1f} "
                     "| | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--max-verify", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/results/compile.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    rows = [measure_dtype(dtype, args, bandwidth) for dtype in args.dtypes.split(",")]
    report = {
        "command": "python benchmarks/bench_compile.py " + " ".join(argv or sys.argv[1:]),
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows,
    }
    atomic_write_json(args.out, report)
    atomic_write_text(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

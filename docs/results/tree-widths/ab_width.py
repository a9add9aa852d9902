"""A/B in one process: trees sized to the verify curve's cheap width against the demo's settings.

On a CPU whose float32 verify curve has a dip at 4 tokens (AVX2: MKL's weight-major kernel works
in blocks of 4 columns; docs/results/avx2-verify), a tree of 3 nodes verifies 4 tokens for about
the price of 2. Arms: the target alone, chain gamma 1 (the demo's saved setting here), chain
gamma 3 (also 4 tokens), trees 3:1, 3:2 and 4:1 (5 tokens). Batch 1, interleaved rounds (the
arm order reversed every other round), medians of the rounds after a warm-up round.

Usage: python ab_width.py PROMPTS TEMPERATURE ROUNDS OUT.json [DRAFT [COUNT TOKENS]]
(defaults: the demo-int8 draft with its int8 weights, 12 prompts, 64 new tokens)
"""

import sys
from pathlib import Path

import torch

from distillspec.decoding.measure import SpeedProbe
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.models.quantize import quantize_draft
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.tools.configs import BenchConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sampled-trees"))
from ab_rule import record_round, write_summary  # noqa: E402

DRAFT = "/work/runs/demo-int8/run/final"
ARMS = {"g1": (1, None), "g3": (3, None), "tree 3:1": (1, "3:1"), "tree 3:2": (1, "3:2"),
        "tree 4:1": (1, "4:1")}


def main():
    prompts_spec, temperature, rounds, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4]
    draft_path = sys.argv[5] if len(sys.argv) > 5 else DRAFT
    count, tokens = (int(sys.argv[6]), int(sys.argv[7])) if len(sys.argv) > 7 else (12, 64)
    target, tok = load_model("builtin:smollm2-135m")
    draft, _ = load_model(draft_path, device=target.device, dtype=target.dtype)
    draft = quantize_draft(draft, "int8")
    prompts = load_prompts_for_bench(BenchConfig(prompts=prompts_spec, num_prompts=count), tok)
    eos, pad = eos_token_ids(target, tok), pad_token_id(tok)
    rows = {}

    def run(label, fn):
        record_round(rows, label, fn)

    for round_ in range(rounds + 1):
        probe = SpeedProbe(target, prompts, max_new_tokens=tokens, batch_size=1,
                           temperature=temperature, eos_token_id=eos, pad_id=pad, seed=round_)
        if round_ == 0:  # warm-up: every arm once on 2 prompts, nothing recorded
            probe.plain(2)
            for gamma, tree in ARMS.values():
                probe.speculative(draft, gamma, tree=tree, batches=2)
            continue
        labels = ["plain", *ARMS]
        for label in labels if round_ % 2 else labels[::-1]:
            if label == "plain":
                run(label, probe.plain)
            else:
                gamma, tree = ARMS[label]
                run(label, lambda probe=probe, g=gamma, t=tree: probe.speculative(draft, g, tree=t))
    write_summary(rows, out, {"capability": torch.backends.cpu.get_cpu_capability(),
                              "dtype": str(target.dtype), "temperature": temperature,
                              "draft": draft_path})


if __name__ == "__main__":
    main()

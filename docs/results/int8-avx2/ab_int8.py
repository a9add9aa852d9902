"""The demo's draft in float32 against the same draft with int8 weights, decoded side by side
in one process on the demo's report split (issue 22's speed targets on an AVX2 CPU).

Run from the repository root:
    .venv/bin/python docs/results/int8-avx2/ab_int8.py DRAFT ROUNDS OUT.json [TEMPERATURES]
First the cost model of each draft (``measure_cost_model``: c and the verify curve, each figure
the median of 7 interleaved rounds), then the first 8 prompts of builtin:chat:train (the demo's
report split), 48 tokens, batch 1, eager steps, at T = 0 and T = 1 (or the comma-separated
TEMPERATURES): the target alone and SD with
each draft (chains γ 1, 2 and tree 4:1), every arm once per round in alternating order, after
a warm-up of every arm. Speed-ups are against the target alone's median of the same run."""

from __future__ import annotations

import json
import statistics
import sys

from distillspec.common.runtime import cpu_name
from distillspec.decoding.measure import SpeedProbe, measure_cost_model
from distillspec.decoding.timing import alternating_rates
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.models.quantize import quantize_draft
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.tools.configs import BenchConfig

SETTINGS = {"g1": (1, None), "g2": (2, None), "tree4:1": (2, "4:1")}


def main() -> None:
    draft_path, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    temperatures = [float(t) for t in (sys.argv[4] if len(sys.argv) > 4 else "0,1").split(",")]
    target, tokenizer = load_model("builtin:smollm2-135m")
    drafts = {"fp32": load_model(draft_path)[0],
              "int8": quantize_draft(load_model(draft_path)[0], "int8")}
    costs = {name: measure_cost_model(target, draft).to_dict() for name, draft in drafts.items()}
    print(json.dumps({n: {"c": round(c["cost_ratio"], 3)} for n, c in costs.items()}), flush=True)
    prompts = load_prompts_for_bench(
        BenchConfig(prompts="builtin:chat:train", num_prompts=8), tokenizer)
    report = {"command": "python " + " ".join(sys.argv), "cpu": cpu_name(),
              "dtype": str(target.dtype), "draft": draft_path,
              "prompts": "builtin:chat:train, first 8", "max_new_tokens": 48,
              "cost_models": costs, "temperatures": {}}
    for temperature in temperatures:
        probe = SpeedProbe(target, prompts, max_new_tokens=48, batch_size=1,
                           temperature=temperature, eos_token_id=eos_token_ids(target, tokenizer),
                           pad_id=pad_token_id(tokenizer), seed=0)
        report["temperatures"][str(temperature)] = measure(probe, drafts, rounds)
    with open(out, "w") as handle:
        json.dump(report, handle, indent=1)


def measure(probe: SpeedProbe, drafts: dict, rounds: int) -> dict:
    """Every arm's tokens/s per round (a warm-up of every arm, kernel timings included, then
    alternating rounds), medians, ÷ the target alone, and SD's block efficiency."""
    blocks: dict[str, float] = {}

    def count(results, name=None) -> int:
        if name is not None:  # block efficiency tau: emitted tokens per target call
            calls = sum(r.metrics.target_forward_passes - r.metrics.prefill_passes
                        for r in results)
            blocks[name] = sum(len(s) for r in results for s in r.sequences) / calls
        return sum(len(s) for r in results for s in r.sequences)

    arms = {"plain": lambda: count(probe.plain())}
    for kind, draft in drafts.items():
        for label, (gamma, tree) in SETTINGS.items():
            name = f"{kind}_{label}"
            arms[name] = (lambda draft=draft, gamma=gamma, tree=tree, name=name:
                          count(probe.speculative(draft, gamma, tree=tree), name))
    rates = alternating_rates(arms, rounds, on_round=lambda index, rates: print(
        "round", index, {k: round(v[-1], 2) for k, v in rates.items()}, flush=True))
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {"rates_tok_s": rates, "median_tok_s": median, "tau": blocks,
            "over_target_alone": {n: v / median["plain"] for n, v in median.items()}}


if __name__ == "__main__":
    main()

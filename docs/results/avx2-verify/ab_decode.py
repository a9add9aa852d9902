"""Decoded A/B of the weight-major choice, side by side in one process: the target alone and SD
(the demo's draft, chains) with every float32 call packed against the per-width choice.

Run from the repository root:
    .venv/bin/python docs/results/avx2-verify/ab_decode.py DRAFT ROUNDS OUT.json
Prompts: the first 8 of builtin:chat:train (the demo's report split), 48 tokens, greedy, batch 1,
eager steps. Each round runs every arm once, in alternating order."""

from __future__ import annotations

import json
import statistics
import sys

from distillspec.common.runtime import cpu_name
from distillspec.decoding import packed_linear
from distillspec.decoding.measure import SpeedProbe
from distillspec.decoding.timing import timed
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.tools.configs import BenchConfig

CHOOSE = packed_linear._prefers_weight_major


def kernels(chosen: bool) -> None:
    packed_linear._prefers_weight_major = CHOOSE if chosen else (lambda *args: False)


def main() -> None:
    draft_path, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    target, tokenizer = load_model("builtin:smollm2-135m")
    draft, _ = load_model(draft_path)
    prompts = load_prompts_for_bench(
        BenchConfig(prompts="builtin:chat:train", num_prompts=8), tokenizer)
    probe = SpeedProbe(target, prompts, max_new_tokens=48, batch_size=1, temperature=0.0,
                       eos_token_id=eos_token_ids(target, tokenizer),
                       pad_id=pad_token_id(tokenizer), seed=0)

    def count(results) -> int:
        return sum(len(s) for r in results for s in r.sequences)

    def arm(chosen: bool, run):
        def call() -> int:
            kernels(chosen)
            return run()
        return call

    arms = {}
    for chosen in (False, True):
        tag = "chosen" if chosen else "packed"
        arms[f"plain_{tag}"] = arm(chosen, lambda: count(probe.plain()))
        for gamma in (1, 3):
            arms[f"sd_g{gamma}_{tag}"] = arm(
                chosen, lambda gamma=gamma: count(probe.speculative(draft, gamma)))
    for call in arms.values():  # warm-up, the kernel timings included
        call()
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for round_ in range(rounds):
        order = list(arms) if round_ % 2 == 0 else list(reversed(arms))
        for name in order:
            wall, tokens = timed(arms[name])
            rates[name].append(tokens / wall)
        print("round", round_, {k: round(v[-1], 2) for k, v in rates.items()}, flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    report = {
        "command": "python " + " ".join(sys.argv), "cpu": cpu_name(),
        "dtype": str(target.dtype), "draft": draft_path, "prompts": "builtin:chat:train, first 8",
        "max_new_tokens": 48, "rates_tok_s": rates, "median_tok_s": median,
        "over_target_alone": {
            name: value / median["plain_" + name.rsplit("_", 1)[1]]
            for name, value in median.items()},
        "chosen_over_packed": {
            name.removesuffix("_packed"): median[name.replace("_packed", "_chosen")] / value
            for name, value in median.items() if name.endswith("_packed")},
    }
    with open(out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({k: report[k] for k in ("median_tok_s", "over_target_alone",
                                            "chosen_over_packed")}, indent=1))


if __name__ == "__main__":
    main()

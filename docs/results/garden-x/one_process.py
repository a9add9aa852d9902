"""The garden's headline ratio in one process: L alone, M alone and M + its DistillSpec draft
(tree 15:2, the setting chosen on the stdlib split) on the same HumanEval held-out prompts,
interleaved rounds, greedy, batch 1, a fixed number of new tokens (no stop strings: every setup
decodes the same lengths up to EOS). tokens/s per setup and round; ratios within each round.

    python one_process.py DRAFT_FOLDER OUT.json [N_PROMPTS] [NEW_TOKENS] [ROUNDS] [WHICH]

WHICH: all (default: L, M and M + draft loaded together), L (L alone only) or M (M alone and
M + draft only): separate processes, for the same comparison without the models sharing one.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from distillspec import Decoder, Request, SamplingConfig, SpeculationConfig
from distillspec.common.io import atomic_write_json
from distillspec.decoding.generate import run_to_completion
from distillspec.models.loading import eos_token_ids, load_model
from distillspec.training.builtin_data import builtin_dataset_items

L_NAME, M_NAME, TREE = "builtin:qwen2.5-coder-1.5b", "builtin:qwen2.5-coder-0.5b", "15:2"


def tokens_per_s(target, draft, prompts, new_tokens, stop_ids, spec) -> tuple[float, int]:
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        decoder = Decoder(target, draft, spec)
        start = time.perf_counter()
        result = run_to_completion(decoder, [Request(list(prompt), new_tokens,
                                                     SamplingConfig(), stop_ids)])
        seconds += time.perf_counter() - start
        tokens += len(result.sequences[0])
    return tokens / seconds, tokens


def main(draft_dir: str, out: str, count: int = 8, new_tokens: int = 64, rounds: int = 2,
         which: str = "all") -> None:
    if which not in ("all", "L", "M"):
        raise ValueError(f"WHICH must be all, L or M, got {which!r}: all loads L, M and the draft "
                         "together, L only L, M only M and the draft.")
    large, tokenizer = load_model(L_NAME) if which in ("all", "L") else (None, None)
    medium, tokenizer = load_model(M_NAME) if which in ("all", "M") else (None, tokenizer)
    draft = load_model(draft_dir)[0] if medium is not None else None
    problems = builtin_dataset_items("humaneval:heldout")[:count]
    prompts = [tokenizer(p.record["prompt"])["input_ids"] for p in problems]
    stop_ids = frozenset(eos_token_ids(large if medium is None else medium, tokenizer))
    chain, tree = SpeculationConfig(gamma=1), SpeculationConfig(gamma=1, tree=TREE)
    setups = {"L alone": (large, None, chain), "M alone": (medium, None, chain),
              f"M + draft, tree {TREE}": (medium, draft, tree)}
    setups = {name: setup for name, setup in setups.items() if setup[0] is not None}
    for target, use_draft, spec in setups.values():  # warm-up: one short prompt each
        tokens_per_s(target, use_draft, prompts[:1], 8, stop_ids, spec)
    rows = {name: [] for name in setups}
    for round_index in range(rounds):
        for name, (target, use_draft, spec) in setups.items():
            speed, tokens = tokens_per_s(target, use_draft, prompts, new_tokens, stop_ids, spec)
            rows[name].append({"tokens_per_s": speed, "tokens": tokens})
            print(f"round {round_index + 1} {name}: {speed:.2f} tok/s ({tokens} tokens)", flush=True)
    base_name = "L alone" if "L alone" in rows else "M alone"
    ratios = {name: [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(row, rows[base_name])]
              for name, row in rows.items()}
    for name, values in ratios.items():
        print(f"{name} / {base_name} per round: {', '.join(f'{v:.2f}' for v in values)}; "
              f"median {statistics.median(values):.2f}")
    atomic_write_json(Path(out), {
        "draft": draft_dir, "prompts": "builtin:humaneval:heldout", "count": count,
        "new_tokens": new_tokens, "rounds": rounds, "tree": TREE, "rows": rows,
        "which": which, f"ratio_to_{base_name[0].lower()}_alone": ratios,
        "dtype": str(next(iter(setups.values()))[0].dtype),
        "cpu_capability": torch.backends.cpu.get_cpu_capability()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:6]), *sys.argv[6:7])

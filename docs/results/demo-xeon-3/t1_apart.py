"""At the demo's sampled temperature, on requests written apart from every split (never
trained on, never chosen on): the fastest greedy chain and every tree the demo timed sampled,
side by side in one sweep (interleaved rounds, the target alone in every round), as the demo
measures its report split, with the draft weights the demo saved (int8 or as loaded): does the
setting it chose sampled (``setting_at(saved, T)``) hold its rank here?

    python t1_apart.py DRAFT_FOLDER PROMPTS.jsonl OUT.json [N_PROMPTS] [ROUNDS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from distillspec.common.io import atomic_write_json
from distillspec.decoding.measure import SpeedProbe, measure_cost_model
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.models.quantize import quantize_draft
from distillspec.models.recommended import saved_setting, setting_at
from distillspec.tools.demo import _prompts

TARGET = "builtin:smollm2-135m"
TREES = ("3:1", "4:1", "15:2")  # the demo's default --trees


def main(draft_dir: str, prompts_path: str, out: str, count: int = 24, rounds: int = 3) -> None:
    target, tokenizer = load_model(TARGET)
    draft, _ = load_model(draft_dir)
    saved = saved_setting(draft_dir)
    if saved is None or saved.get("sampled") is None:
        raise SystemExit(f"{draft_dir} holds no sampled setting: run `distillspec demo` first.")
    if saved["draft_quantize"] == "int8":
        draft = quantize_draft(draft, "int8")
    temperature = saved["sampled"]["temperature"]
    sampled = setting_at(saved, temperature)
    chain = {"gamma": sampled["gamma"], "confidence_threshold": sampled["confidence_threshold"]}
    settings = {f"γ {chain['gamma']}": {**chain, "tree": ""}}
    settings |= {f"tree {tree}": {"gamma": 1, "confidence_threshold": 0.0, "tree": tree}
                 for tree in TREES}
    prompts = _prompts(prompts_path, tokenizer, 128)[:count]
    probe = SpeedProbe(target, prompts, max_new_tokens=64, temperature=temperature,
                       eos_token_id=eos_token_ids(target, tokenizer),
                       pad_id=pad_token_id(tokenizer))
    cost = measure_cost_model(target, None, max_verify=16)
    start = time.perf_counter()
    sweep = probe.sweep(draft, [(s["gamma"], s["confidence_threshold"], s["tree"])
                                for s in settings.values()], rounds, cost)
    result = sweep.to_dict()
    record = {"draft": draft_dir, "prompts": prompts_path, "count": len(prompts),
              "temperature": temperature, "chosen": sampled,
              "draft_quantize": saved["draft_quantize"], "rounds": rounds, "settings": settings,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "dtype": str(target.dtype), "sweep": result,
              "seconds": time.perf_counter() - start}
    atomic_write_json(Path(out), record)
    for name, row in zip(settings, result["rows"], strict=True):
        rounds_text = ", ".join(f"{r:.3f}" for r in row["speedup_rounds"])
        print(f"T={temperature:g} {name}: {row['speedup']:.3f}x (rounds {rounds_text}), "
              f"tau {row['block_efficiency']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:6]))

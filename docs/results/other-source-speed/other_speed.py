"""The demo's saved setting on chat prompts of another source (issue 20's "≥ 1.4× on chat
prompts from another source"): alpha and SD ÷ target alone, measured as `distillspec demo`
measures its report split (SpeedProbe, batch 1, eager steps, interleaved rounds), on the
requests written apart from every split (docs/results/written-prompts-2/other-eval.jsonl:
never trained on, never chosen on).

    python other_speed.py DRAFT_FOLDER PROMPTS.jsonl OUT.json [N_PROMPTS] [ROUNDS] [T,...]
(temperatures: 0,1 unless given)
"""

from __future__ import annotations

import json
import sys
import time

import torch

from distillspec.decoding.measure import SpeedProbe, measure_cost_model
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.models.recommended import saved_setting
from distillspec.tools.demo import _prompts
from distillspec.training.evaluate import SDEvaluator

TARGET = "builtin:smollm2-135m"


def main(draft_dir: str, prompts_path: str, out: str, count: int = 24, rounds: int = 3,
         temperatures: tuple[float, ...] = (0.0, 1.0)) -> None:
    target, tokenizer = load_model(TARGET)
    draft, _ = load_model(draft_dir)
    setting = saved_setting(draft_dir)
    if setting is None:
        raise SystemExit(f"{draft_dir} holds no saved setting: run `distillspec demo` first.")
    prompts = _prompts(prompts_path, tokenizer, 128)[:count]
    eos, pad = eos_token_ids(target, tokenizer), pad_token_id(tokenizer)
    chosen = (setting["gamma"], setting["confidence_threshold"], setting["tree"])
    cost = measure_cost_model(target, None, max_verify=16)
    record = {"draft": draft_dir, "prompts": prompts_path, "count": len(prompts),
              "setting": dict(zip(("gamma", "confidence_threshold", "tree"), chosen)),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "dtype": str(target.dtype), "rounds": rounds, "by_temperature": {}}
    evaluator = SDEvaluator(target, prompts, max_new_tokens=64, tau_prompts=0, gamma=1,
                            eos_token_id=eos, seed=0, pad_id=pad)
    record["alpha"] = evaluator.alpha(draft)
    print("alpha", record["alpha"], flush=True)
    for temperature in temperatures:
        start = time.perf_counter()
        probe = SpeedProbe(target, prompts, max_new_tokens=64, temperature=temperature,
                           eos_token_id=eos, pad_id=pad)
        sweep = probe.sweep(draft, [chosen], rounds, cost)
        record["by_temperature"][str(temperature)] = {
            "sweep": sweep.to_dict(), "seconds": time.perf_counter() - start}
        best = sweep.to_dict()["best"]
        print(f"T={temperature}: target {sweep.plain_tokens_per_s:.1f} tok/s, SD "
              f"{best['tokens_per_s']:.1f}, {best['speedup']:.3f}x, rounds "
              f"{best.get('speedup_rounds')}, tau {best['block_efficiency']:.2f}", flush=True)
    with open(out, "w") as handle:
        json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:6]),
         *[tuple(float(t) for t in a.split(",")) for a in sys.argv[6:7]])

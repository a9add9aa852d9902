"""Padding a float32 call's rows to a multiple of 4, side by side: the target's verify curve and
batched one-token steps with the per-width kernel choice among packed / weight-major ("before")
against packed / weight-major / padded weight-major ("after").

Runs at commit bf19fc7, which had the padded kernel; it was taken out again after this
measurement (README.md says why), so check that commit out first:
    .venv/bin/python docs/results/avx2-verify/pad_ab.py [ROUNDS]
Each mode keeps its own kernel choices (timed on first use, as in a fresh process); rounds
alternate the order. Writes pad_ab.json beside this file.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from verify_curve import batched_step_seconds, demo_sized_draft

from distillspec.decoding import packed_linear
from distillspec.decoding.measure import measure_cost_model
from distillspec.models.loading import load_model

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
OUT = Path(__file__).with_name("pad_ab.json")
ALL_KERNELS = dict(packed_linear._KERNELS)
MODES = {"before": {k: v for k, v in ALL_KERNELS.items() if k != "padded"}, "after": ALL_KERNELS}
CHOICES = {mode: {} for mode in MODES}
STEP_ROWS = (2, 3, 4, 7, 8)


def measure(model, draft, mode: str) -> dict:
    packed_linear._KERNELS, packed_linear._kernel_choice = MODES[mode], CHOICES[mode]
    cost = measure_cost_model(model, draft, max_verify=8, repeats=7)
    return {"step_ms": cost.target_step_s * 1e3,
            "verify_curve": {k: s / cost.verify_s[1] for k, s in cost.verify_s.items()},
            "batched_step_ms": {r: batched_step_seconds(model, r) * 1e3 for r in STEP_ROWS}}


def main() -> None:
    with torch.inference_mode():
        model, tokenizer = load_model("builtin:smollm2-135m", dtype="auto")
        draft = demo_sized_draft(model, tokenizer)
        runs = {mode: [] for mode in MODES}
        for round_ in range(ROUNDS):
            for mode in (("before", "after") if round_ % 2 == 0 else ("after", "before")):
                runs[mode].append(measure(model, draft, mode))
                print(mode, json.dumps(runs[mode][-1], default=float)[:400], flush=True)
    packed_linear._KERNELS = ALL_KERNELS
    summary = {mode: {
        "step_ms": statistics.median(r["step_ms"] for r in rs),
        "verify_curve": {k: statistics.median(r["verify_curve"][k] for r in rs)
                         for k in rs[0]["verify_curve"]},
        "batched_step_ms": {n: statistics.median(r["batched_step_ms"][n] for r in rs)
                            for n in STEP_ROWS}} for mode, rs in runs.items()}
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rounds": ROUNDS, "summary": summary, "runs": runs,
              "choices": {m: {str(k): v for k, v in c.items()} for m, c in CHOICES.items()}}
    OUT.write_text(json.dumps(report, indent=1, default=float) + "\n")
    for mode, s in summary.items():
        curve = " ".join(f"{k}:{v:.2f}" for k, v in s["verify_curve"].items())
        rows = " ".join(f"{n}:{v:.1f}" for n, v in s["batched_step_ms"].items())
        print(f"{mode}: step {s['step_ms']:.1f} ms, V(k) {curve}; batched ms {rows}")


if __name__ == "__main__":
    main()

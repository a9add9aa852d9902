"""The target's verify curve V(k) with and without the weight-major kernel choice, side by side.

Run from the repository root:  .venv/bin/python docs/results/avx2-verify/verify_curve.py
Loads the default target (in the dtype ``auto`` picks here), then times, in alternating rounds in
one process, the engine's own k-token verify call (``measure_cost_model``, k = 1..16) with every
float32 call on oneDNN's packed weights ("packed") and with the per-width kernel choice
("chosen"); and a batched one-token step of 4 and 16 rows each way. Writes verify_curve.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from distillspec.decoding import packed_linear
from distillspec.decoding.kv_cache import CachedModel
from distillspec.decoding.measure import measure_cost_model
from distillspec.decoding.metrics import predicted_speedup
from distillspec.models.loading import build_draft, load_model

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3  # alternating rounds per mode
OUT = Path(__file__).with_name("verify_curve.json")


def batched_step_seconds(model, rows: int, repeats: int = 15) -> float:
    """Median seconds of a one-token step of ``rows`` rows after a 64-token prompt each."""
    import time

    cached = CachedModel(model, rows=rows, slots=64 + 4)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (rows, 64), generator=torch.Generator().manual_seed(rows))
    cached.forward(prompt)
    token = prompt[:, -1:]
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        cached.forward(token)
        times.append(time.perf_counter() - start)
        cached.rollback([1] * rows)
    return statistics.median(times[2:])


def demo_sized_draft(model, tokenizer):
    """The demo's draft shape (the target's first 2 layers, an 8192-token head): weights
    untrained, which changes nothing in its step time."""
    return build_draft("target-layers:2:vocab=8192", model, tokenizer,
                       token_ids=torch.arange(8192))


def measure(model, draft, chosen: bool) -> dict:
    original = packed_linear._prefers_weight_major
    if not chosen:
        packed_linear._prefers_weight_major = lambda *args: False
    try:
        cost = measure_cost_model(model, draft, max_verify=16, repeats=7)
        batched = {rows: batched_step_seconds(model, rows) for rows in (4, 16)}
    finally:
        packed_linear._prefers_weight_major = original
    return {"step_ms": cost.target_step_s * 1e3, "draft_cost_ratio": cost.cost_ratio,
            "verify_curve": {k: s / cost.verify_s[1] for k, s in cost.verify_s.items()},
            "batched_step_ms": {rows: s * 1e3 for rows, s in batched.items()}}


def main() -> None:
    with torch.inference_mode():
        model, tokenizer = load_model("builtin:smollm2-135m", dtype="auto")
        draft = demo_sized_draft(model, tokenizer)
        rounds = {"packed": [], "chosen": []}
        for round_ in range(ROUNDS):
            for mode in ("packed", "chosen") if round_ % 2 == 0 else ("chosen", "packed"):
                rounds[mode].append(measure(model, draft, mode == "chosen"))
                print(mode, json.dumps(rounds[mode][-1], default=float)[:300], flush=True)
    summary = {}
    for mode, runs in rounds.items():
        summary[mode] = {
            "step_ms": statistics.median(r["step_ms"] for r in runs),
            "draft_cost_ratio": statistics.median(r["draft_cost_ratio"] for r in runs),
            "verify_curve": {k: statistics.median(r["verify_curve"][k] for r in runs)
                             for k in runs[0]["verify_curve"]},
            "batched_step_ms": {rows: statistics.median(r["batched_step_ms"][rows] for r in runs)
                                for rows in runs[0]["batched_step_ms"]},
        }
    for s in summary.values():  # Leviathan et al.'s speed-up with the measured c and V(k)
        s["predicted_chain_speedup"] = {
            f"alpha {alpha} gamma {gamma}": predicted_speedup(
                alpha, gamma, s["draft_cost_ratio"], s["verify_curve"][gamma + 1])
            for alpha in (0.36, 0.40) for gamma in (1, 2, 3)}
    report = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "rounds": ROUNDS, "summary": summary, "runs": rounds,
        "weight_major_choices": {str(k): v for k, v in packed_linear._weight_major.items()},
        "command": " ".join(sys.argv),
    }
    OUT.write_text(json.dumps(report, indent=1, default=float) + "\n")
    for mode in ("packed", "chosen"):
        s = summary[mode]
        curve = " ".join(f"{k}:{v:.2f}" for k, v in s["verify_curve"].items())
        print(f"{mode}: step {s['step_ms']:.1f} ms, c {s['draft_cost_ratio']:.3f}, "
              f"batched {s['batched_step_ms']}, V(k) {curve}")
        print("  predicted:", {k: round(v, 3) for k, v in s["predicted_chain_speedup"].items()})


if __name__ == "__main__":
    main()

"""Per-step phase times (the engine's draft / target timers) of tree 3:1 and chain gamma 1,
greedy against T = 1: the demo-int8 draft (int8 weights), 6 report-split prompts, 64 tokens,
batch 1, one warm-up round then one timed round.    python phase_t1.py"""

from distillspec.decoding.measure import SpeedProbe
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.models.quantize import quantize_draft
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.tools.configs import BenchConfig

PHASES = ("wall_time_s", "draft_time_s", "target_time_s", "prefill_time_s")


def main():
    target, tok = load_model("builtin:smollm2-135m")
    draft, _ = load_model("/work/runs/demo-int8/run/final", device=target.device,
                          dtype=target.dtype)
    draft = quantize_draft(draft, "int8")
    prompts = load_prompts_for_bench(BenchConfig(prompts="builtin:chat:train", num_prompts=6),
                                     tok)
    for round_ in range(2):
        for temperature in (0.0, 1.0):
            for tree in ("3:1", None):
                probe = SpeedProbe(target, prompts, max_new_tokens=64, batch_size=1,
                                   temperature=temperature, eos_token_id=eos_token_ids(target, tok),
                                   pad_id=pad_token_id(tok), seed=0)
                if round_ == 0:  # warm-up
                    probe.speculative(draft, 1, tree=tree, batches=1)
                    continue
                metrics = [r.metrics for r in probe.speculative(draft, 1, tree=tree)]
                steps = sum(m.target_forward_passes for m in metrics) - len(metrics)  # no prefill
                wall, drafting, verifying, prefill = (sum(getattr(m, k) for m in metrics)
                                                      for k in PHASES)
                per_step = {"wall": wall - prefill, "draft": drafting, "target": verifying,
                            "other": wall - drafting - verifying - prefill}
                print(f"T={temperature} {tree or 'g1':4s} steps {steps} ms/step "
                      + " ".join(f"{k} {1000 * v / steps:.1f}" for k, v in per_step.items()),
                      flush=True)


if __name__ == "__main__":
    main()

"""Sampled alpha as a function of the draft's temperature (issue 20 / 22, T = 1).

The sampled SD rule is exact for any draft distribution q it actually samples from, and its
acceptance is alpha = E[sum_v min(p_v, q_v)]. A draft that is flatter (or sharper) than the
target after distillation might overlap p more when its logits are divided by a temperature of
its own: q = softmax(draft_logits / (T * s)) for a scale s, p = softmax(target_logits / T).
This measures alpha_t1 along the target's own T = 1 samples (the trainer's held-out alpha,
``SDEvaluator``) for several s, per prompt set.

    python calibrate.py DRAFT_FOLDER OUT.json SPEC [SPEC ...]
"""

from __future__ import annotations

import json
import sys

import torch

from distillspec.decoding.acceptance import analytic_acceptance
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import pad_vocab, warp
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.tools.demo import _prompts
from distillspec.training.evaluate import SDEvaluator

SCALES = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25)


@torch.inference_mode()
def alpha_by_scale(evaluator: SDEvaluator, draft, temperature: float) -> dict[str, float]:
    totals = {s: 0.0 for s in SCALES}
    count = 0.0
    target_sampling = SamplingConfig(temperature=temperature)
    for batch, target_logits in zip(evaluator.batches[temperature],
                                    evaluator.target_logits[temperature]):
        draft_logits = evaluator._logits(draft, batch)
        width = max(draft_logits.shape[-1], target_logits.shape[-1])
        target_probs = warp(pad_vocab(target_logits, width), target_sampling)
        mask = batch.loss_mask.to(target_probs.device)
        for scale in SCALES:
            draft_probs = warp(pad_vocab(draft_logits, width),
                               SamplingConfig(temperature=temperature * scale))
            totals[scale] += float((analytic_acceptance(target_probs, draft_probs) * mask).sum())
        count += float(mask.sum())
    return {f"{s:g}": totals[s] / count for s in SCALES}


def main(draft_dir: str, out: str, *specs: str) -> None:
    target, tokenizer = load_model("builtin:smollm2-135m")
    draft, _ = load_model(draft_dir)
    eos, pad = eos_token_ids(target, tokenizer), pad_token_id(tokenizer)
    record = {"draft": draft_dir, "dtype": str(target.dtype),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "sets": {}}
    for spec in specs:
        prompts = _prompts(spec, tokenizer, 128)
        evaluator = SDEvaluator(target, prompts, max_new_tokens=64, tau_prompts=0, gamma=1,
                                eos_token_id=eos, seed=0, pad_id=pad)
        record["sets"][spec] = {"prompts": len(prompts),
                                "alpha_t1_by_scale": alpha_by_scale(evaluator, draft, 1.0)}
        print(spec, json.dumps(record["sets"][spec]), flush=True)
    with open(out, "w") as handle:
        json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])

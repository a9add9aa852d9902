"""Target T=1 mass on the draft's top-k tokens (deterministic tree children, 'sample the target,
descend if it is a child' rule) against 1 - TVD (one sampled child, rejection rule)."""
import sys, time, torch
from distillspec.models.loading import load_pair, pad_token_id, eos_token_ids
from distillspec.training.evaluate import SDEvaluator
from distillspec.decoding.acceptance import analytic_acceptance
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import pad_vocab, warp
from distillspec.tools.demo import _prompts

target, draft, tok = load_pair("builtin:smollm2-135m", sys.argv[1])
pad, eos = pad_token_id(tok), eos_token_ids(target, tok)
T = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
splits = {"choice": _prompts("builtin:chat:heldout", tok, 128)[:12],
          "report": _prompts("builtin:chat:train", tok, 128)[:16]}
for name, prompts in splits.items():
    ev = SDEvaluator(target, prompts, max_new_tokens=64, tau_prompts=0, gamma=1,
                     eos_token_id=eos, seed=0, pad_id=pad)
    sums = {}; cnt = 0.0
    with torch.inference_mode():
        for batch, tl in zip(ev.batches[1.0], ev.target_logits[1.0]):
            dl = ev._logits(draft, batch)
            w = max(dl.shape[-1], tl.shape[-1])
            p = warp(pad_vocab(tl, w), SamplingConfig(temperature=T))
            q = warp(pad_vocab(dl, w), SamplingConfig(temperature=T))
            m = batch.loss_mask.float()
            vals = {"1-tvd": analytic_acceptance(p, q)}
            top = torch.topk(pad_vocab(dl, w).float(), 8, dim=-1).indices
            mass = torch.gather(p, -1, top).cumsum(-1)
            for k in (1, 2, 3, 4, 8):
                vals[f"p(top{k})"] = mass[..., k - 1]
            for key, v in vals.items():
                sums[key] = sums.get(key, 0.0) + float((v * m).sum())
            cnt += float(m.sum())
    print(name, {k: round(v / cnt, 4) for k, v in sums.items()}, flush=True)

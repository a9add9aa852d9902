"""Analytic alpha at target T=1 against a draft sampled at temperature Td (lossless SD uses
the q the draft sampled from, so Td is free). Choice and report splits of the demo."""
import sys, time, torch
from distillspec.models.loading import load_pair, pad_token_id, eos_token_ids
from distillspec.training.evaluate import SDEvaluator
from distillspec.decoding.acceptance import analytic_acceptance
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import pad_vocab, warp
from distillspec.tools.demo import _prompts

draft_path = sys.argv[1]
temps = [float(t) for t in sys.argv[2].split(",")]
target, draft, tok = load_pair("builtin:smollm2-135m", draft_path)
pad, eos = pad_token_id(tok), eos_token_ids(target, tok)
splits = {"choice": _prompts("builtin:chat:heldout", tok, 128)[:12],
          "report": _prompts("builtin:chat:train", tok, 128)[:16]}
for name, prompts in splits.items():
    t0 = time.time()
    ev = SDEvaluator(target, prompts, max_new_tokens=64, tau_prompts=0, gamma=1,
                     eos_token_id=eos, seed=0, pad_id=pad)
    row = {}
    with torch.inference_mode():
        for td in temps:
            tot = cnt = 0.0
            for batch, tl in zip(ev.batches[1.0], ev.target_logits[1.0]):
                dl = ev._logits(draft, batch)
                w = max(dl.shape[-1], tl.shape[-1])
                acc = analytic_acceptance(warp(pad_vocab(tl, w), SamplingConfig(temperature=1.0)),
                                          warp(pad_vocab(dl, w), SamplingConfig(temperature=td)))
                m = batch.loss_mask
                tot += float((acc * m).sum()); cnt += float(m.sum())
            row[td] = tot / cnt
    print(name, {k: round(v, 4) for k, v in row.items()}, f"{time.time()-t0:.0f}s", flush=True)

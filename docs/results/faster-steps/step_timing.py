"""Median seconds per training step, side by side in one process: the demo's v10 recipe
(its run's distill_config.json), steps through the trainer's own loop, 40 per arm, two rounds.
Arms: AdamW's per-tensor loop, the fused kernel, fused + length_grouping 16 (attention SDPA,
as the draft was built). The eager-attention arm was the same script with
``draft.config._attn_implementation`` set per arm (step_timing.json has both runs).
    python step_timing.py    # needs /work/runs/demo-v10 (the v10 demo's run folder)
"""
import json, sys, time, torch, statistics, dataclasses
from distillspec.common.config import from_dict
from distillspec.training.config import DistillConfig
from distillspec.training import setup, loop
cfg = json.load(open('/work/runs/demo-v10/run/distill_config.json'))
cfg['output_dir'] = '/tmp/prof/run'; cfg['overwrite'] = True; cfg['resume'] = False
cfg['eval_prompts'] = 1; cfg['length_grouping'] = 16
config = from_dict(DistillConfig, cfg)
folder, resume_from = setup.open_folders(config)
run = loop._build(config, folder, None)
draft = run.accelerator.unwrap_model(run.opt.draft)
trainable = [p for p in draft.parameters() if p.requires_grad]
fused = run.opt.optimizer
plain = torch.optim.AdamW(trainable, lr=1e-5)
lengths = run.train_lengths
def timed(n=40):
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); loop._one_step(run); ts.append(time.perf_counter()-t)
    return statistics.median(ts)
for _ in range(3): loop._one_step(run)
res = {}
for rnd in range(2):
    for name, opt, lens in (('plain', plain, None), ('fused', fused, None), ('fused+group16', fused, lengths)):
        run.opt.optimizer = opt; run.train_lengths = lens
        res.setdefault(name, []).append(round(timed(), 4))
    print(res, flush=True)

"""Median seconds per training step, side by side in one process: the demo's v10 recipe (its
run's distill_config.json), steps through the trainer's own loop, 40 per arm, two rounds.

Arms: AdamW's per-tensor loop, the fused kernel, fused + length_grouping 16, each with the
draft's attention as built (SDPA); ``--attention`` times fused + length_grouping 16 with SDPA
against eager instead (step_timing.json has both runs).
    python step_timing.py [--attention]    # needs /work/runs/demo-v10 (the v10 demo's run)
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from distillspec.common.config import from_dict
from distillspec.training import loop, setup
from distillspec.training.config import DistillConfig

RECIPE = Path("/work/runs/demo-v10/run/distill_config.json")


def main(attention: bool) -> None:
    values = json.loads(RECIPE.read_text())
    values.update(output_dir="/tmp/step-timing", overwrite=True, resume=False, eval_prompts=1,
                  length_grouping=16, train_attention="auto" if attention else "sdpa")
    config = from_dict(DistillConfig, values)
    folder, _ = setup.open_folders(config)
    run = loop._build(config, folder, None)
    draft = run.accelerator.unwrap_model(run.opt.draft)
    fused, lengths = run.opt.optimizer, run.train_lengths
    plain = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-5)
    arms = {"adamw_loop": (plain, None, "sdpa"), "adamw_fused": (fused, None, "sdpa"),
            "fused_group16": (fused, lengths, "sdpa")}
    if attention:
        arms = {"fused_group16_sdpa": (fused, lengths, "sdpa"),
                "fused_group16_eager": (fused, lengths, "eager")}
    for _ in range(3):
        loop._one_step(run)
    results: dict[str, list[float]] = {}
    for _ in range(2):
        for name, (optimizer, group_lengths, kernel) in arms.items():
            run.opt.optimizer, run.train_lengths, run.opt.attention = optimizer, group_lengths, kernel
            seconds = []
            for _ in range(40):
                start = time.perf_counter()
                loop._one_step(run)
                seconds.append(time.perf_counter() - start)
            results.setdefault(name, []).append(round(statistics.median(seconds), 4))
        print(results, flush=True)


if __name__ == "__main__":
    main("--attention" in sys.argv[1:])

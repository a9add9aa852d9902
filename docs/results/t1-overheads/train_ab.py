"""Training steps with and without ``keep_freed_memory``: the demo's own distillation (its saved
config: the cached top-32 data, 2 layers + an 8192-token head, batch 8) for 220 steps, no eval,
in a fresh process per arm; the median and mean step seconds after step 40.

    python train_ab.py /work/runs/demo/run/distill_config.json default   # glibc as it starts
    python train_ab.py /work/runs/demo/run/distill_config.json keep      # what every command does
"""

import json
import statistics
import sys
from pathlib import Path

import distillspec.common.runtime as runtime

if sys.argv[2] == "default":  # before the change: apply_threads leaves malloc alone
    runtime.keep_freed_memory = lambda: False

from distillspec.common.config import from_dict, replace  # noqa: E402
from distillspec.training.config import DistillConfig  # noqa: E402
from distillspec.training.loop import distill  # noqa: E402

config = from_dict(DistillConfig, json.loads(Path(sys.argv[1]).read_text()))
out = f"train-ab-{sys.argv[2]}"
config = replace(config, output_dir=out, max_steps=220, max_minutes=10, eval_every=0,
                 save_every=0, overwrite=True, resume=False, eval_prompts=2, eval_tau_prompts=0)
distill(config)  # calls apply_threads, which keeps freed memory unless patched above
records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
seconds = [r["step_seconds"] for r in records if "step_seconds" in r and r["step"] > 40]
print(sys.argv[2], "median step", round(statistics.median(seconds), 4), "mean",
      round(statistics.mean(seconds), 4), "steps", len(seconds))

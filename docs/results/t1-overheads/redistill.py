"""The demo's distillation again, as the demo ran it (its saved config: 12 training minutes,
cached data, seed 0), into another folder; the trainer's held-out alpha (the demo's choice split,
12 prompts, 64 tokens) every 200 steps lands in the folder's metrics.jsonl.

    python redistill.py /work/runs/demo/run/distill_config.json /work/scratch/redistill
"""
import json
import sys
from pathlib import Path

from distillspec.common.config import from_dict, replace
from distillspec.training.config import DistillConfig
from distillspec.training.loop import distill

saved = json.loads(Path(sys.argv[1]).read_text())
config = replace(from_dict(DistillConfig, saved), output_dir=sys.argv[2], overwrite=True,
                 resume=False)
print(distill(config))

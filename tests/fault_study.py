"""Run ``distillspec study ARGS...`` and SIGKILL it right after cell CELL wrote its checkpoint
at step STEP (deterministic, however fast the steps are). Used by test_study.py, not collected:
    python tests/fault_study.py CELL STEP ARGS...
"""

from __future__ import annotations

import os
import signal
import sys

from distillspec.tools.cli import main
from distillspec.training import checkpoint

cell, step, *args = sys.argv[1:]
real_save = checkpoint.save_checkpoint


def save_checkpoint(checkpoints, number, *rest, **kwargs):
    folder = real_save(checkpoints, number, *rest, **kwargs)
    if checkpoints.parent.name == cell and number == int(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return folder


checkpoint.save_checkpoint = save_checkpoint
sys.exit(main(["study", *args]))

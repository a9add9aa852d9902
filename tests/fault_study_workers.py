"""Run ``distillspec study ARGS...`` (with --workers N) and SIGKILL the worker that runs cell
CELL right after it wrote its checkpoint at step STEP (deterministic, however fast the steps
are). The patch is at the top level because spawned workers import this file as
``__mp_main__``, so it runs in each of them. Used by test_study.py, not collected:
    python tests/fault_study_workers.py CELL STEP ARGS...
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

from distillspec.training import checkpoint

cell, step = sys.argv[1], int(sys.argv[2])
real_save = checkpoint.save_checkpoint


def save_checkpoint(checkpoints, number, *rest, **kwargs):
    folder = real_save(checkpoints, number, *rest, **kwargs)
    in_worker = multiprocessing.current_process().name.startswith("study-worker")
    if in_worker and checkpoints.parent.name == cell and number == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return folder


checkpoint.save_checkpoint = save_checkpoint

if __name__ == "__main__":
    from distillspec.tools.cli import main

    sys.exit(main(["study", *sys.argv[3:]]))

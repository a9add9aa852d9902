"""Run ``distillspec distill`` with a signal raised at one point of the step-6 checkpoint write.

Used by test_safety.py (not collected by pytest):
    python tests/fault_run.py RECIPE.yaml POINT SIGNAL
POINT: staging (files written, manifest not yet), rename (folder in place, pointer not yet),
pointer (new pointer written to its temporary file, not yet renamed), prune (pointer updated,
old checkpoints not yet pruned). SIGNAL: KILL or INT.
"""

from __future__ import annotations

import os
import signal
import sys

from distillspec.common.io import atomic_writer
from distillspec.tools.cli import main
from distillspec.training import checkpoint

recipe, point, name = sys.argv[1:4]
number = getattr(signal, f"SIG{name}")
state = {"saving": None, "fired": False}


def fire(where: str) -> None:
    if where == point and state["saving"] == "step-000006" and not state["fired"]:
        state["fired"] = True
        os.kill(os.getpid(), number)


real_save, real_manifest, real_prune = (
    checkpoint.save_model_folder, checkpoint._write_manifest, checkpoint.prune,
)


def save_model_folder(folder, *args, **kwargs):
    state["saving"] = folder.name
    return real_save(folder, *args, **kwargs)


def write_manifest(folder):
    fire("staging")
    return real_manifest(folder)


def write_pointer(path, text):
    fire("rename")
    with atomic_writer(path) as handle:
        handle.write(text)
        handle.flush()
        fire("pointer")


def prune(*args, **kwargs):
    fire("prune")
    return real_prune(*args, **kwargs)


checkpoint.save_model_folder = save_model_folder
checkpoint._write_manifest = write_manifest
checkpoint.atomic_write_text = write_pointer
checkpoint.prune = prune
sys.exit(main(["distill", "--config", recipe]))

"""Atomic training checkpoints: write to a temporary folder, then rename.

A checkpoint folder ``step-000050/`` holds the draft in Hugging Face format (safetensors), the
tokenizer, ``distill_config.yaml`` (the resolved recipe), a model card, and ``trainer_state.pt``
(optimiser, scheduler, RNG states, data position) which is read back with
``torch.load(weights_only=True)``, so it cannot execute code. ``latest`` names the newest
complete checkpoint and is replaced atomically after the rename: a run killed at any moment
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def save_model_folder(
    folder: Path, model, tokenizer, config: dict, card: str, state: dict[str, Any] | None = None
) -> None:
    """Save an HF model folder atomically (temporary sibling folder, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "distill_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (staging / "README.md").write_text(card)
        if state is not None:
            torch.save(state, staging / "trainer_state.pt")
        if folder.exists():  # re-saving the same step (e.g. final after a resume)
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    config: dict,
    card: str,
    state: dict[str, Any],
    keep: int,
) -> Path:
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    save_model_folder(folder, model, tokenizer, config, card, state)
    atomic_write_text(run_dir / "checkpoints" / "latest", folder.name + "\n")
    _prune(run_dir / "checkpoints", keep)
    return folder


def _prune(checkpoints: Path, keep: int) -> None:
    complete = sorted(p for p in checkpoints.glob("step-*") if ".tmp-" not in p.name)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoints.glob("*.tmp-*"):  # from a run killed mid-save
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:  # e.g. a half-written `latest` pointer
            leftover.unlink(missing_ok=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = run_dir / "checkpoints" / pointer.read_text().strip()
    return folder if (folder / "trainer_state.pt").is_file() else None


def load_trainer_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / "trainer_state.pt", weights_only=True)

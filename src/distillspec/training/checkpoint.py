"""Training checkpoints you can trust: atomic, verified, found again after any crash.

A checkpoint ``checkpoints/step-000050/`` holds the draft (safetensors), the tokenizer,
``distill_config.yaml`` (the resolved recipe), a model card, ``trainer_state.pt`` (optimiser,
scheduler, RNG states, data position; read back with ``torch.load(weights_only=True)``, so it
cannot execute code) and, written last, ``manifest.json``: every file's size and sha256.

* Saving stages everything in a temporary sibling folder and renames it into place, then
  replaces the ``latest`` pointer atomically. A run killed at any moment leaves the previous
  checkpoint or the new one, never half of one.
* ``find_resumable`` trusts nothing: it tries the pointer's checkpoint, then every other one,
  newest first, and takes the first whose files match its manifest; the ones it skips are
  reported (a truncated newest checkpoint falls back to the previous complete one).
* Pruning deletes only folders that carry our manifest, and leftovers of our own temporary
  names; it never follows a symbolic link.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from distillspec.common.config import field_default
from distillspec.common.io import atomic_write_text, jsonl_lines
from distillspec.models.pruned_head import (
    full_vocabulary,
    is_pruned,
    load_pruned_head,
    save_pruned_head,
)

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
POINTER = "latest"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2))


def verify_folder(folder: Path) -> str | None:
    """None when every file listed in the manifest is present and intact, else what is wrong."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder"
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest (an interrupted save?)"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} were saved"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def save_model_folder(
    folder: Path, model, tokenizer, config: dict, card: str, state: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> None:
    """Save an HF model folder (+ manifest) atomically: temporary sibling folder, then rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        with full_vocabulary(model):  # plain transformers/vLLM/llama.cpp load this folder
            model.save_pretrained(staging, safe_serialization=True)
        save_pruned_head(model, staging)
        tokenizer.save_pretrained(staging)
        (staging / "distill_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (staging / "README.md").write_text(card)
        if metrics is not None:  # what exports put on their model cards
            (staging / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
        if state is not None:
            torch.save(state, staging / STATE)
        _write_manifest(staging)
        if folder.is_symlink():
            raise ValueError(f"{folder} is a symbolic link; refusing to replace it.")
        if folder.exists():  # re-saving the same step (e.g. final after a resume)
            previous = folder.with_name(folder.name + ".tmp-old")
            folder.rename(previous)
            staging.rename(folder)
            shutil.rmtree(previous)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_checkpoint(
    checkpoints: Path, step: int, model, tokenizer, config: dict, card: str,
    state: dict[str, Any], keep: int,
) -> Path:
    folder = checkpoints / f"step-{step:06d}"
    save_model_folder(folder, model, tokenizer, config, card, state)
    atomic_write_text(checkpoints / POINTER, folder.name + "\n")
    prune(checkpoints, keep)
    return folder


def _ours(checkpoints: Path) -> list[Path]:
    """Our complete-looking checkpoint folders, oldest first (never links)."""
    return sorted(
        p
        for p in checkpoints.glob("step-*")
        if ".tmp-" not in p.name and not p.is_symlink() and (p / MANIFEST).is_file()
    )


def prune(checkpoints: Path, keep: int) -> None:
    """Keep the newest ``keep`` of our checkpoints; remove our interrupted temporaries."""
    for old in _ours(checkpoints)[:-keep]:
        # Renamed first (atomic), so a run killed mid-removal never leaves a half-removed folder
        # under a checkpoint's name; the next prune removes the temporary.
        doomed = old.with_name(old.name + ".tmp-removing")
        old.rename(doomed)
        shutil.rmtree(doomed)
    for leftover in checkpoints.glob("*.tmp-*"):  # from a run killed mid-save
        if leftover.is_symlink() or leftover.is_file():
            leftover.unlink()
        elif leftover.name.startswith("step-"):
            shutil.rmtree(leftover)
    for leftover in checkpoints.glob(f".{POINTER}.*.tmp"):  # a half-written pointer
        leftover.unlink()


@dataclass
class Resumable:
    folder: Path | None
    skipped: list[str]  # "step-000060: trainer_state.pt does not match its checksum"


def find_resumable(checkpoints: Path) -> Resumable:
    """The newest verified checkpoint: the pointer's first, then every other one, newest first."""
    if checkpoints.is_symlink():
        raise ValueError(f"{checkpoints} is a symbolic link; refusing to read checkpoints from it.")
    if not checkpoints.is_dir():
        return Resumable(None, [])
    candidates = list(reversed(_ours(checkpoints)))
    pointer = checkpoints / POINTER
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if named and (checkpoints / named) in candidates:
        candidates.remove(checkpoints / named)
        candidates.insert(0, checkpoints / named)
    skipped = []
    for folder in candidates:
        problem = verify_folder(folder)
        if problem is None:
            return Resumable(folder, skipped)
        skipped.append(f"{folder.name}: {problem}")
    return Resumable(None, skipped)


def has_run_state(run_dir: Path) -> bool:
    """Anything an earlier training run leaves behind."""
    checkpoints = run_dir / "checkpoints"
    return (
        (checkpoints.is_dir() and any(checkpoints.iterdir()))
        or (run_dir / "final").exists()
        or (run_dir / "metrics.jsonl").exists()
    )


def load_weights(folder: Path, draft, device) -> None:
    """A checkpoint's (whole) weights into ``draft``."""
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(shard, device=str(device)))
    if is_pruned(draft):  # the pruned head comes from its own file
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        load_pruned_head(draft, folder, require_same=True)
    missing, unexpected = draft.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ValueError(
            f"Checkpoint {folder} does not match the draft: missing {missing}, "
            f"unexpected {unexpected}. Resume with the same draft_init."
        )
    if draft.config.tie_word_embeddings:
        draft.tie_weights()


# Knobs that decide which parameters train: the optimiser state of a checkpoint holds moments
# for exactly those, matched by position, so a resume must keep them.
TRAINABLE_KNOBS = ("train_layers", "train_embeddings", "train_lm_head")


def check_same_trainables(folder: Path, config) -> None:
    """Refuse to resume ``folder`` with other trainable parameters than ``config`` (a
    DistillConfig) trains; a knob missing from an older checkpoint reads as its default."""
    path = folder / "distill_config.yaml"
    saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(saved, dict):
        return  # nothing recorded to compare (the weights and state are checked elsewhere)
    defaults = {f.name: field_default(f) for f in fields(config) if f.name in TRAINABLE_KNOBS}
    for key in TRAINABLE_KNOBS:
        before, now = saved.get(key, defaults[key]), getattr(config, key)
        if before != now:
            raise ValueError(
                f"{folder} was trained with {key} {before!r}, this run sets {now!r}: its optimiser "
                "state belongs to the parameters that trained then. Resume with the same "
                f"{key}, or start a new run (--overwrite, or another --output-dir)."
            )


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer state saved beside the weights: counters, optimiser, schedule, RNG."""
    return torch.load(folder / STATE, weights_only=True)


def rng_state(generator: torch.Generator, policy: Any) -> dict[str, Any]:
    """This process's random state: torch, the sampling generator, Python, the data policy."""
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": list(random.getstate()[1]),
    }
    if hasattr(policy, "state_dict"):
        state["policy"] = policy.state_dict()
    return state


def restore_state(saved: dict, train_state: Any, generator, policy, rank: int) -> None:
    """The inverse of saving: train counters, and this rank's RNG and policy state."""
    for key, value in saved["train"].items():
        setattr(train_state, key, value)
    rank_rng = saved["rng"][min(rank, len(saved["rng"]) - 1)]
    torch.set_rng_state(rank_rng["torch"])
    generator.set_state(rank_rng["generator"])
    random.setstate((3, tuple(rank_rng["python"]), None))
    if "policy" in rank_rng and hasattr(policy, "load_state_dict"):
        policy.load_state_dict(rank_rng["policy"])


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (a resumed run writes them again): no duplicate steps."""
    if not path.is_file():
        return
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; refusing to write through it.")
    kept = []
    for line in jsonl_lines(path.read_text(encoding="utf-8")):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def model_card(config, metrics: dict[str, float], step: int, train_seconds: float) -> str:
    """The README.md of a saved draft: recipe, measured alpha/tau, how to use it."""
    measured = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) or "| (not measured) | |"
    jsd = f" (beta={config.jsd_beta})" if config.divergence == "jsd" else ""
    mix = {"mixed": f" ({config.mix})",
           "warm": f" (warm_fraction {config.warm_fraction:g})"}.get(config.policy, "")
    return f"""---
library_name: transformers
tags: [distillspec, speculative-decoding, draft-model]
---
# DistillSpec draft for `{config.target}`

A draft model for speculative decoding, distilled from the target's logits with distillspec.
Use it as `assistant_model=` in `transformers` generate, or with `distillspec generate --draft`.

## Recipe
- target: `{config.target}`; draft initialisation: `{config.draft_init}`
- divergence: `{config.divergence}`{jsd}; data policy: `{config.policy}`{mix}
- data: `{config.data}`; steps: {step}; batch {config.batch_size} x accumulation {config.grad_accum}; lr {config.lr}
- training time: {train_seconds / 60:.1f} min

## Measured on held-out prompts (target-generated continuations)
| metric | value |
|---|---|
{measured}

alpha_tT = mean of sum min(p, q) at temperature T; tau = tokens per target call of greedy SD with
gamma={config.eval_gamma}. The full recipe is in `distill_config.yaml`.
"""

"""The speculation setting a draft was measured fastest at, saved inside the draft's folder.

``distillspec demo`` measures its distilled draft at several (gamma, threshold, tree) settings side by
side with the target alone, together with the machine's cost model (draft step, verify curve).
It writes the fastest setting and that cost model to ``FILE`` in the draft folder, tagged with
the machine kind (CPU model and threads, or GPU name), target and dtype it was measured with. ``generate``
and ``serve`` use it when the user left gamma, the threshold and the tree at their defaults and runs on
the same kind of machine: a speed figure measured elsewhere says nothing here. On a CPU the demo
also measures the draft with int8 weights and saves which weights were faster
(``draft_quantize``); ``--draft-quantize auto`` (the default) loads the draft that way.
The demo also times a few settings at a sampling temperature and saves the fastest there as
``sampled`` (its own gamma, threshold, tree and speed-up): ``setting_at`` gives generate the one
for its temperature.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from distillspec.common.io import atomic_write_json
from distillspec.common.runtime import machine_kind
from distillspec.decoding.params import MAX_GAMMA
from distillspec.decoding.tree import Tree

FILE = "distillspec_speculation.json"


def save_recommended(
    folder: Path,
    *,
    target: str,
    gamma: int,
    confidence_threshold: float,
    tree: str = "",
    lookup: int = 0,
    draft_quantize: str = "none",
    device,
    dtype,
    measured: dict[str, Any],
    sampled: dict[str, Any] | None = None,
) -> Path:
    """Write the fastest measured setting (and what it was measured with) to ``folder/FILE``;
    ``sampled``: the fastest at a sampling temperature (``temperature``, ``gamma``,
    ``confidence_threshold``, ``tree``, ``speedup``), if the demo measured one."""
    path = Path(folder) / FILE
    saved = {
        "target": str(target),
        "gamma": int(gamma),
        "confidence_threshold": float(confidence_threshold),
        "tree": str(tree),
        "lookup": int(lookup),
        "draft_quantize": str(draft_quantize),
        "machine": machine_kind(device),
        "dtype": str(dtype),
        "measured": measured,
    }
    if sampled is not None:
        saved["sampled"] = sampled
    atomic_write_json(path, saved)
    return path


def _valid_setting(entry: Any) -> bool:
    """A gamma in 1..MAX_GAMMA, a threshold in [0, 1), a tree spec that parses ('' = chain)
    and a prompt lookup in 0..MAX_GAMMA (absent: 0, files written before it)."""
    if not isinstance(entry, dict):
        return False
    gamma, threshold, tree = (entry.get(k) for k in ("gamma", "confidence_threshold", "tree"))
    lookup = entry.setdefault("lookup", 0)
    whole = lambda n: isinstance(n, int) and not isinstance(n, bool)  # noqa: E731
    valid = (whole(gamma) and 1 <= gamma <= MAX_GAMMA
             and _number(threshold) is not None and 0 <= threshold < 1
             and isinstance(tree, str) and whole(lookup) and 0 <= lookup <= MAX_GAMMA)
    if not valid:
        return False
    try:
        Tree.parse(tree)
    except ValueError:  # a hand-edited or future file: ignore it rather than fail
        return False
    return True


def saved_setting(folder: Path | str) -> dict[str, Any] | None:
    """The setting saved in a draft folder, whatever it was measured with (``recommended_for``
    checks that), if there is a valid one, else None."""
    path = Path(folder) / FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    saved.setdefault("tree", "")  # files written before trees: a chain
    # Files written before the demo measured int8 weights: the draft as loaded.
    valid = _valid_setting(saved) and saved.setdefault("draft_quantize", "none") in ("none",
                                                                                     "int8")
    if not valid:
        return None
    sampled = saved.pop("sampled", None)
    if _valid_setting(sampled) and _number(sampled.get("temperature"), above=0):
        # a sampled setting without a valid speed-up still serves; an invalid one is dropped
        saved["sampled"] = {**sampled, "speedup": _number(sampled.get("speedup"))}
    measured = saved.get("measured")
    speedup = measured.get("speedup") if isinstance(measured, dict) else None
    return {**saved, "speedup": _number(speedup)}


def _number(value: Any, above: float | None = None) -> float | None:
    """``value`` if it is a finite number (greater than ``above`` when given), else None."""
    fine = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return value if fine and (above is None or value > above) else None


def setting_at(saved: dict[str, Any], temperature: float) -> dict[str, Any]:
    """The saved setting for decoding at ``temperature``: the sampled one for T > 0 when the
    demo measured one (gamma, confidence_threshold, tree, lookup, speedup, temperature), else
    the greedy one (whose tree also serves sampled rows, timed at greedy only; its prompt
    lookup is dropped: a sampled row keeps a copied token with probability p(token) only,
    which pays only where measured)."""
    if temperature > 0 and saved.get("sampled") is not None:
        return saved["sampled"]
    setting = {key: saved[key] for key in ("gamma", "confidence_threshold", "tree", "lookup",
                                           "speedup")}
    return {**setting, "lookup": 0} if temperature > 0 else setting


def recommended_for(folder: Path | str, target: str, device, dtype) -> dict[str, Any] | None:
    """The saved setting of a draft folder if it was measured with ``target`` on this machine
    kind and dtype (and is a valid setting), else None."""
    saved = saved_setting(folder)
    if saved is None:
        return None
    same = (saved.get("target"), saved.get("machine"), saved.get("dtype")) == (
        str(target), machine_kind(device), str(dtype))
    return saved if same else None


def measured_quantization(folder: Path | str, target: str, device, dtype) -> str:
    """``--draft-quantize auto``: the draft weights (int8 or none) the demo measured faster for
    the draft in ``folder`` with ``target`` on this machine kind and dtype; none when nothing
    was measured here (or the folder is not a draft folder, or the device is not a CPU)."""
    if torch.device(device).type != "cpu" or not Path(folder).is_dir():
        return "none"
    saved = recommended_for(folder, target, device, dtype)
    return saved["draft_quantize"] if saved is not None else "none"


def resolved_quantization(mode: str, folder: Path | str, target: str, target_model) -> str:
    """``--draft-quantize`` for the draft in ``folder`` decoding for ``target_model`` (loaded from
    ``target``): auto as ``measured_quantization`` says, int8 and none as given."""
    if mode != "auto":
        return mode
    return measured_quantization(folder, str(target), target_model.device, target_model.dtype)

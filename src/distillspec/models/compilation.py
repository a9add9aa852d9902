"""Whether a model's decoding steps run compiled: ``--compile auto|on|off``, decided by measurement.

``decoding.kv_cache.compile_steps`` says *how* (static shapes, ``torch.compile``); this module
says *where*. ``distillspec bench`` times every model's steps eager and compiled side by side
(``decoding.measure.compare_step_paths``) and records a verdict per model kind, machine kind,
dtype and torch version in ``verdicts_path()`` (its gain the median of the last few benches').
``auto`` compiles a model only where such a verdict measured a gain of at least ``MIN_GAIN``
(and, when the caller knows how many tokens it will generate, only if they save more than the
measured compile time). On a machine or model nobody measured it stays eager, so ``auto`` is
never slower than eager by assumption. ``on`` compiles regardless; ``off`` never does.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillspec.common.io import atomic_write_json
from distillspec.common.runtime import machine_kind
from distillspec.decoding.kv_cache import compile_steps
from distillspec.decoding.packed_linear import packs
from distillspec.decoding.params import COMPILE_CHOICES
from distillspec.models.quantize import draft_quantization
from distillspec.models.registry import cache_dir

MIN_GAIN = 1.05  # compiled steps must be this much faster: below it is within the noise here
# Verdicts pool the gains of the last few benches of the same key: on a 2-core VM one bench
# measured a draft's compiled steps 1.02x, 1.07x and 1.18x in three runs of one day, and a
# verdict taken from the last run alone flipped with that noise.
GAIN_HISTORY = 5


@dataclass(frozen=True)
class Decision:
    """What ``apply_compile`` chose for one model, and why (printed by the tools)."""

    role: str
    compiled: bool
    reason: str

    def describe(self) -> str:
        return f"{self.role} steps {'compiled' if self.compiled else 'eager'} ({self.reason})"


def verdicts_path() -> Path:
    """``$DISTILLSPEC_COMPILE_VERDICTS``, else ``cache_dir()/compile-verdicts.json``."""
    override = os.environ.get("DISTILLSPEC_COMPILE_VERDICTS")
    return Path(override) if override else cache_dir() / "compile-verdicts.json"


def model_kind(model: torch.nn.Module) -> str:
    """What a step time depends on: architecture, depth, width, vocabulary (pruned or not)."""
    config = model.config
    head = model.get_output_embeddings()
    outputs = head.weight.shape[0] if hasattr(head, "weight") else config.vocab_size
    return (f"{config.model_type}:{config.num_hidden_layers}x{config.hidden_size}:"
            f"vocab {outputs}")


def verdict_key(model: torch.nn.Module) -> str:
    # packed linear layers change both step paths: a verdict measured without them is not reused
    steps = " | packed linears" if packs(model) else ""
    return (f"{machine_kind(model.device)} | {model.dtype} | torch {torch.__version__} | "
            f"{model_kind(model)}{steps}")


def load_verdicts(path: Path | None = None) -> dict[str, Any]:
    path = path or verdicts_path()
    try:
        verdicts = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return verdicts if isinstance(verdicts, dict) else {}


def record_verdict(model: torch.nn.Module, measured: dict[str, Any],
                   path: Path | None = None) -> dict[str, Any]:
    """Save what the bench measured for ``model`` here: ``measured`` holds ``gain`` (eager
    step time / compiled step time), ``compile_s`` and the figures behind them. The verdict is
    the latest measurement with ``gain`` the median of the last ``GAIN_HISTORY`` measured
    gains under the same key (``gains``; ``last_gain``: this bench's)."""
    path = path or verdicts_path()
    verdicts = load_verdicts(path)
    key = verdict_key(model)
    verdict = {**measured, "last_gain": measured["gain"],
               "gains": (_gains(verdicts.get(key)) + [measured["gain"]])[-GAIN_HISTORY:]}
    verdict["gain"] = statistics.median(verdict["gains"])
    verdicts[key] = verdict
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, verdicts)
    return verdict


def _gains(previous: Any) -> list[float]:
    """The gains an earlier verdict pooled (one, for a verdict written before pooling)."""
    if not isinstance(previous, dict):
        return []
    gains = previous.get("gains", [previous.get("gain")])
    return [float(g) for g in gains if isinstance(g, (int, float))]


def decide(mode: str, model: torch.nn.Module, role: str, batch_size: int = 1,
           tokens: int | None = None, verdicts: dict[str, Any] | None = None) -> Decision:
    """``tokens``: how many tokens the run will generate, when known; ``auto`` then also
    needs the time they save to exceed the compile time the bench measured. The saving is
    priced as one one-token step per token for every model: an upper bound for an SD target,
    which runs about tokens / tau verify calls, so a borderline run may compile without
    quite paying for it."""
    if mode not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {mode!r}.")
    if mode == "off":
        return Decision(role, False, "--compile off")
    if draft_quantization(model) != "none":
        return Decision(role, False, "int8 weights (--draft-quantize): eager, the dynamically "
                                     "quantized layers are not compiled")
    if mode == "on":
        return Decision(role, True, "--compile on")
    if batch_size > 1:
        return Decision(role, False, "auto: verdicts are measured at batch 1, and a batch "
                                     "compiles a new graph for every row count as rows finish")
    verdicts = load_verdicts() if verdicts is None else verdicts
    measured = verdicts.get(verdict_key(model))
    if not isinstance(measured, dict) or not isinstance(measured.get("gain"), (int, float)):
        return Decision(role, False, "auto: not measured on this machine kind; "
                                     "`distillspec bench` measures it")
    gain = float(measured["gain"])
    runs = len(_gains(measured))
    measured_here = (f"the bench measured {gain:.2f}x here" if runs <= 1 else
                     f"{runs} benches here measured {gain:.2f}x (median)")
    saved_s, compile_s = _saving(measured, tokens), measured.get("compile_s")
    if gain >= MIN_GAIN and saved_s is not None and isinstance(compile_s, (int, float)) and (
            saved_s < compile_s):
        return Decision(role, False, f"auto: {measured_here}, but "
                                     f"{tokens} tokens would save ~{saved_s:.0f} s against "
                                     f"~{compile_s:.0f} s of compiling")
    if gain >= MIN_GAIN:
        return Decision(role, True, f"auto: {measured_here}")
    return Decision(role, False, f"auto: {measured_here}, below {MIN_GAIN:.2f}x")


def _saving(measured: dict[str, Any], tokens: int | None) -> float | None:
    """Seconds ``tokens`` one-token steps save compiled (None when unknown)."""
    try:
        return tokens * (measured["eager_ms"]["1"] - measured["compiled_ms"]["1"]) / 1e3
    except (KeyError, TypeError):  # no token count, or a verdict without step times
        return None


def apply_compile(mode: str, batch_size: int = 1, tokens: int | None = None,
                  **models: torch.nn.Module | None) -> list[Decision]:
    """Decide for each model (keyword = its role) and mark or unmark its steps accordingly."""
    decisions, verdicts = [], load_verdicts() if mode == "auto" else {}
    for role, model in models.items():
        if model is None:
            continue
        decision = decide(mode, model, role, batch_size, tokens, verdicts)
        compile_steps(model, decision.compiled)
        decisions.append(decision)
    return decisions


def summary(decisions: list[Decision]) -> str:
    """One line for the user: what runs compiled, and that the first steps pay for it."""
    line = "; ".join(decision.describe() for decision in decisions)
    if any(decision.compiled for decision in decisions):
        line += (". The first steps of each new shape compile (seconds for a small draft, up to "
                 "minutes for a large target with a cold cache; torch caches the kernels)")
    return line

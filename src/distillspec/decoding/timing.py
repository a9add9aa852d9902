"""The one synchronised timer: queued GPU work is finished before the clock is read.

A ``Decoder`` measures through an optional probe (``Probe``): with none, a step never waits for
the device; with ``SyncTimer`` every phase of a step (prefill, draft, target) is timed with
``timed`` and summed into the decoder's metrics.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU, where calls are synchronous)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[..., T], *args: Any, device=None) -> tuple[float, T]:
    """``(seconds, fn(*args))``, synchronising ``device`` before both clock reads."""
    synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    synchronize(device)
    return time.perf_counter() - start, result


class Probe(Protocol):
    """Measures one phase of a decoding step: ``(seconds, fn(*args))``."""

    def __call__(self, fn: Callable[..., T], *args: Any) -> tuple[float, T]: ...


class SyncTimer:
    """The probe behind every reported time: ``timed`` on one device."""

    def __init__(self, device: torch.device | str | None):
        self.device = device

    def __call__(self, fn: Callable[..., T], *args: Any) -> tuple[float, T]:
        return timed(fn, *args, device=self.device)


def interleaved_medians(calls: dict, repeats: int, device=None) -> dict:
    """Median seconds per call, timed in ``repeats`` rounds that each run every call once, after
    a warm-up of every call: drift (a busy or throttling machine, the first calls after a load)
    hits every figure alike instead of whichever was timed first."""
    for call in calls.values():
        call()
    seconds: dict = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            seconds[key].append(timed(call, device=device)[0])
    return {key: statistics.median(values) for key, values in seconds.items()}


def alternating_rates(calls: dict[str, Callable[[], float]], rounds: int, device=None, *,
                      warmup: bool = True, on_round: Callable[[int, dict], None] | None = None,
                      ) -> dict[str, list[float]]:
    """Per call, what it returned (e.g. tokens) per second in each of ``rounds`` rounds, after a
    warm-up of every call (``warmup``; off: the caller warmed them more cheaply). Each round
    runs every call once, in reversed order every other round, so drift and the warmth left by
    a neighbour hit every call alike. ``on_round(index, rates)`` after each round (progress)."""
    for call in calls.values() if warmup else ():
        call()
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for index in range(rounds):
        order = list(calls) if index % 2 == 0 else list(reversed(calls))
        for name in order:
            seconds, units = timed(calls[name], device=device)
            rates[name].append(units / seconds)
        if on_round is not None:
            on_round(index, rates)
    return rates

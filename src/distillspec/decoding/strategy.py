"""What a block strategy sees and promises: ``Models`` (the decoder's shared state) and
``Strategy`` (one block for the live rows).

A ``Decoder`` keeps the rows, admission and leaving; a strategy (``chain.ChainStep``,
``tree_step.TreeStep``) runs one speculative block for the rows it is given, each row drafting
at most its cap, and returns one ``RowUpdate`` per row, in row order. It updates each row's
host state (pending tokens, output, counts) and both caches, and counts its forward passes in
``models.metrics``; it measures a phase only through ``models.measure`` (no probe: no device
synchronisation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch

from distillspec.decoding.kv_cache import CachedModel
from distillspec.decoding.metrics import GenerationMetrics
from distillspec.decoding.params import SpeculationConfig
from distillspec.decoding.requests import RowUpdate, _Row

T = TypeVar("T")


class Models(Protocol):
    """The decoder's state a strategy reads: both cached models (the draft may be swapped or
    dropped between steps), the shared vocabulary width, the settings and the metrics."""

    target: CachedModel
    draft: CachedModel | None
    speculation: SpeculationConfig
    device: torch.device
    vocab: int
    context: int | None
    generator: torch.Generator | None
    metrics: GenerationMetrics

    def measure(self, phase: str, fn: Callable[..., T], *args: Any) -> T: ...


class Strategy(Protocol):
    """One block for every given row; ``lookahead`` bounds each row's cap (its draft length)."""

    @property
    def lookahead(self) -> int: ...

    def step(self, rows: list[_Row], caps: list[int]) -> list[RowUpdate]: ...


def caps_for(rows: list[_Row], lookahead: int) -> list[int]:
    """Each row's cap: the lookahead, but one token short of its budget (the block's last token
    is the target's own)."""
    return [min(lookahead, row.remaining - 1) for row in rows]


def pending_tokens(rows: list[_Row], device) -> tuple[torch.Tensor, list[int]]:
    """The rows' draft-pending tokens (1 or 2 each; more after plain blocks), left-padded: ``([B, W], pads)``."""
    width = max(len(row.draft_pending) for row in rows)
    pads = [width - len(row.draft_pending) for row in rows]
    tokens = torch.tensor(
        [[0] * pad + row.draft_pending for row, pad in zip(rows, pads)], device=device
    )
    return tokens, pads


def first(entries: list | None, count: int) -> list | None:
    """The first ``count`` entries (the tokens a row really emitted), or None."""
    return None if entries is None else entries[:count]

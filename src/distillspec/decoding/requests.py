"""Requests and their per-row state on the host: budget, pending tokens, output, counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from distillspec.decoding.metrics import DecodeCounts
from distillspec.decoding.params import SamplingConfig


@dataclass
class Request:
    """One sequence to decode: its prompt ids, budget, sampling and stop ids."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_token_ids: frozenset[int] = frozenset()
    seed: int | None = None  # own generator: reproducible whatever shares the batch
    request_id: Any = None
    # Target log-probabilities (decoding/logprobs.py), with this many alternatives per position;
    # None: not computed. ``prompt_logprobs`` scores the prompt's own tokens (then a budget of 0
    # is allowed: a scoring request).
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class TokenLogprobs(NamedTuple):
    """One position: the taken token's log-probability under the target and the most likely
    tokens' (id, log-probability), most likely first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RowUpdate:
    """What one ``step`` produced for one request."""

    request_id: Any
    new_tokens: list[int]
    finished: bool
    finish_reason: str | None  # "eos" (a stop id), "length" or "cancelled" when finished
    drafted: int = 0  # draft tokens this row proposed in the step
    accepted: int = 0  # of which the target accepted
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # per prompt token (first: None)


@dataclass
class _Row:
    request: Request
    counts: DecodeCounts
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    target_pending: int = 0  # the last token, not yet in the target's cache
    draft_pending: list[int] = field(default_factory=list)  # 1 or 2 tokens for the draft
    finish_reason: str | None = None

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.output)

    def emit(self, tokens: list[int]) -> list[int]:
        """Append tokens up to the budget and the first stop id; returns what was appended."""
        taken = []
        for token in tokens[: self.remaining]:
            taken.append(token)
            if token in self.request.stop_token_ids:
                self.finish_reason = "eos"
                break
        self.output += taken
        if self.finish_reason is None and self.remaining <= 0:
            self.finish_reason = "length"
        return taken


def output_width(model: PreTrainedModel) -> int:
    """Columns of the model's logits (its LM head rows, or a pruned head's full width)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


def context_length(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)

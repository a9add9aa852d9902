"""Requests and their per-row state on the host: budget, pending tokens, output, counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from distillspec.decoding.metrics import DecodeCounts
from distillspec.decoding.ngram import NgramIndex
from distillspec.decoding.params import SamplingConfig, check_seed


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
    # Prompt tokens before it that the target has not read either: a row that joined for a
    # ragged step (Decoder._joins_ragged) reads them in that step.
    target_prefix: list[int] = field(default_factory=list)
    draft_pending: list[int] = field(default_factory=list)  # tokens the draft has not read
    finish_reason: str | None = None
    ngrams: NgramIndex | None = None  # prompt lookup's index of its context (lookup_step.py)

    @property
    def context(self) -> list[int]:
        """Every token of the row so far: its prompt, then its output."""
        return self.request.prompt_ids + self.output

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


def check_request(request: Request, vocab: int, context: int | None) -> None:
    """Refuse an impossible request (for models of ``vocab`` output columns and ``context``
    positions) before anything is allocated for it."""
    check_seed(request.seed, "Request.seed")
    budget = request.max_new_tokens
    scoring = request.prompt_logprobs is not None  # a budget of 0 only scores the prompt
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1 - scoring:
        raise ValueError(f"max_new_tokens must be an integer >= 1 (0 with prompt_logprobs), "
                         f"got {budget!r}.")
    for name in ("logprobs", "prompt_logprobs"):
        top = getattr(request, name)
        if top is not None and (isinstance(top, bool) or not isinstance(top, int)
                                or not 0 <= top <= vocab):
            raise ValueError(f"{name} must be None or an integer in [0, {vocab}], got {top!r}.")
    if not request.prompt_ids:
        raise ValueError("Empty prompt: every row needs at least one token.")
    length = len(request.prompt_ids)
    if context is not None:
        if length > context or (length == context and budget > 0):
            raise ValueError(
                f"Prompt of {length} tokens is longer than the context of the model "
                f"({context} positions). Shorten the prompt."
            )
        if length + budget > context:
            raise ValueError(
                f"Prompt ({length} tokens) + max_new_tokens ({budget}) exceeds the "
                f"context ({context} positions). Use max_new_tokens <= {context - length}."
            )
    if max(request.prompt_ids) >= vocab or min(request.prompt_ids) < 0:
        raise ValueError(
            f"Prompt token ids must be in [0, {vocab}) for this model; got "
            f"{min(request.prompt_ids)}..{max(request.prompt_ids)}."
        )

"""Batch front ends over the step-level engine: a left-padded batch in, new tokens out.

``speculative_generate`` and ``autoregressive_generate`` are short loops over a ``Decoder``:
add one request per row, step until every row is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from distillspec.decoding.batching import left_pad, unpad
from distillspec.decoding.engine import Decoder
from distillspec.decoding.metrics import GenerationMetrics
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.decoding.requests import Request, RowUpdate
from distillspec.decoding.timing import SyncTimer, synchronize
from distillspec.decoding.tree import Tree


@dataclass
class GenerationResult:
    """New token ids per row (ragged, EOS included when hit) and the run's metrics."""

    sequences: list[list[int]]
    metrics: GenerationMetrics


def _stop_ids(eos_token_id: int | Iterable[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(i) for i in eos_token_id)


def run_to_completion(
    decoder: Decoder,
    requests: list[Request],
    on_update: Callable[[RowUpdate], None] | None = None,
) -> GenerationResult:
    """Add ``requests``, step until all are done (``on_update`` sees every row's new tokens as
    they are accepted); outputs and counts in request order."""
    for index, request in enumerate(requests):
        request.request_id = index
        decoder.add(request)
    start = time.perf_counter()
    while decoder.has_work:
        for update in decoder.step():
            if on_update is not None:
                on_update(update)
    synchronize(decoder.device)
    done = sorted(decoder.finished, key=lambda row: row.request.request_id)
    metrics = decoder.metrics
    metrics.wall_time_s = time.perf_counter() - start
    for row in done:
        row.counts.new_tokens = len(row.output)
    metrics.rows = [row.counts for row in done]
    metrics.finish_reasons = [row.finish_reason for row in done]
    return GenerationResult([row.output for row in done], metrics)


def _requests(input_ids, attention_mask, max_new_tokens, sampling, eos_token_id) -> list[Request]:
    stop = _stop_ids(eos_token_id)
    return [
        Request(prompt, max_new_tokens, sampling, stop) for prompt in unpad(input_ids, attention_mask)
    ]


def speculative_generate(
    target: PreTrainedModel,
    draft: PreTrainedModel | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gamma: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    lenience: str | None = None,
    epsilon: float = 1.0,
    confidence_threshold: float = 0.0,
    tree: str | Tree | None = "",
    lookup: int = 0,
    lookup_ngram: int = 2,
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
    timed: bool = True,
) -> GenerationResult:
    """Speculative decoding of a (left-padded) batch: lossless unless ``lenience`` is set.

    ``input_ids [B, L]`` with ``attention_mask`` 1 on real tokens (left padding). Returns the new
    tokens per row; each row stops on its own at an EOS id or after ``max_new_tokens``.
    ``eos_token_id=None`` means no early stop. ``generator`` seeds sampling.
    ``confidence_threshold`` > 0 turns on adaptive drafting, ``tree`` tree drafting (a spec or a
    parsed ``Tree``; greedy rows: the draft's top-k; sampled rows: draws from q; see
    ``SpeculationConfig``), ``lookup`` > 0 prompt lookup blocks (up to that many tokens copied from
    the row's context, verified losslessly at any temperature; ``draft`` may then be None). ``timed``: measure the draft, target and prefill times (the
    metrics' ``*_time_s``; a synchronised timer around each phase of a step).
    """
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    speculation = SpeculationConfig(
        gamma=gamma,
        lenience=lenience or "none",
        epsilon=epsilon,
        confidence_threshold=confidence_threshold,
        tree=tree or "",
        lookup=lookup,
        lookup_ngram=lookup_ngram,
    )
    requests = _requests(input_ids, attention_mask, max_new_tokens, sampling, eos_token_id)
    probe = SyncTimer(target.device) if timed else None
    decoder = Decoder(target, draft, speculation, generator=generator, probe=probe)
    return run_to_completion(decoder, requests)


def autoregressive_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
    timed: bool = True,
) -> GenerationResult:
    """Plain decoding through the same cache, warp and sampling code: the fair baseline
    (``timed``: as for ``speculative_generate``)."""
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    requests = _requests(input_ids, attention_mask, max_new_tokens, sampling, eos_token_id)
    probe = SyncTimer(model.device) if timed else None
    return run_to_completion(Decoder(model, None, generator=generator, probe=probe), requests)


def generate_many(
    model: PreTrainedModel,
    prompts: Iterable[list[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    batch_size: int = 64,
    seed: int | None = None,
    on_done: Callable[[int, list[int]], bool | None] | None = None,
) -> dict[int, list[int]]:
    """Plain decoding of many prompts with continuous batching: up to ``batch_size`` rows are
    live, and a finished row's place is taken by the next prompt at the next step, so the batch
    stays full (much faster than fixed batches whose rows finish at different times).

    Prompt i samples from its own generator seeded ``seed + i`` (greedy ignores it), so its
    output does not depend on what shares the batch. ``on_done(i, tokens)`` is called as each
    prompt finishes; returning True stops the run (live rows are cancelled). Returns
    {prompt index: new tokens} for the finished prompts.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    sampling = sampling or SamplingConfig()
    stop = _stop_ids(eos_token_id)
    decoder = Decoder(model, None)
    source = iter(enumerate(prompts))
    outputs: dict[int, list[int]] = {}
    partial: dict[int, list[int]] = {}
    exhausted = stopping = False
    while True:
        while not (exhausted or stopping) and len(decoder.rows) + len(decoder.queue) < batch_size:
            item = next(source, None)
            if item is None:
                exhausted = True
                break
            index, prompt = item
            partial[index] = []
            row_seed = None if seed is None else seed + index
            decoder.add(Request(list(prompt), max_new_tokens, sampling, stop, row_seed, index))
        if not decoder.has_work:
            return outputs
        for update in decoder.step():
            partial[update.request_id] += update.new_tokens
            if update.finished and update.finish_reason != "cancelled":
                outputs[update.request_id] = partial.pop(update.request_id)
                if on_done is not None and on_done(update.request_id, outputs[update.request_id]):
                    stopping = True
        if stopping:
            for index in list(partial):
                decoder.cancel(index)


def generate_ids(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Plain decoding of token-id prompts as one batch (continuous batching: ``generate_many``)."""
    input_ids, attention_mask = left_pad(prompts, pad_id, model.device)
    result = autoregressive_generate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=eos_token_id,
        generator=generator,
        timed=False,
    )
    return result.sequences

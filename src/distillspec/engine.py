"""Batched speculative decoding and the autoregressive baseline, through the same model calls.

One speculative step for the active rows of a batch:
1. the draft samples ``g`` tokens autoregressively from its warped distributions q_1..q_g;
2. the target scores ``[last token, x_1..x_g]`` in one forward pass: p_1..p_{g+1};
3. ``acceptance.verify`` keeps a prefix of n tokens per row and samples one more (residual or bonus);
4. both caches forget their rejected slots (``kv_cache.CachedModel.rollback``); rows that
   accepted everything feed x_g and the bonus token to the draft at the start of the next step;
5. rows that hit EOS or ``max_new_tokens`` leave the batch.
``g`` is gamma, shortened near the end so no row drafts far past its token budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from distillspec.acceptance import analytic_acceptance, verify
from distillspec.config import SamplingConfig, SpeculationConfig
from distillspec.kv_cache import CachedModel, ensure_croppable
from distillspec.metrics import DecodeCounts, GenerationMetrics
from distillspec.sampling import pad_vocab, sample, warp


@dataclass
class GenerationResult:
    """New token ids per row (ragged, EOS included when hit) and the run's metrics."""

    sequences: list[list[int]]
    metrics: GenerationMetrics


def speculative_generate(
    target: PreTrainedModel,
    draft: PreTrainedModel,
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
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Speculative decoding of a (left-padded) batch: lossless unless ``lenience`` is set.

    ``input_ids [B, L]`` with ``attention_mask`` 1 on real tokens (left padding). Returns the new
    tokens per row; each row stops on its own at an EOS id or after ``max_new_tokens``.
    ``eos_token_id=None`` means no early stop. ``generator`` seeds sampling.
    """
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    speculation = SpeculationConfig(gamma=gamma, lenience=lenience or "none", epsilon=epsilon)
    ensure_croppable(target)
    ensure_croppable(draft)
    decoder = _Decoder(target, draft, input_ids, attention_mask, max_new_tokens, eos_token_id)
    return decoder.run_speculative(sampling, speculation, generator)


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
) -> GenerationResult:
    """Plain decoding through the same cache, warp and sampling code: the fair baseline."""
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    decoder = _Decoder(model, None, input_ids, attention_mask, max_new_tokens, eos_token_id)
    return decoder.run_autoregressive(sampling, generator)


# ---------------------------------------------------------------------------------------------


def _check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be 2-D [batch, length], got shape {tuple(input_ids.shape)}. "
            "Wrap a single prompt as input_ids[None]."
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
            f"shape {tuple(input_ids.shape)}."
        )
    lengths = attention_mask.sum(dim=1)
    if input_ids.shape[0] == 0 or bool((lengths == 0).any()):
        raise ValueError(
            "Empty prompt: every row needs at least one token. Add a BOS token or some text."
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "Prompts must be left-padded (the last column must be a real token in every row). "
            "Set tokenizer.padding_side = 'left'."
        )
    return attention_mask


def _check_lengths(model: PreTrainedModel, longest_prompt: int, max_new_tokens: int) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None:
        return
    name = type(model).__name__
    if longest_prompt >= context:
        raise ValueError(
            f"Prompt of {longest_prompt} tokens is longer than the context of {name} "
            f"({context} positions). Shorten the prompt."
        )
    if longest_prompt + max_new_tokens > context:
        raise ValueError(
            f"Prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context of {name} ({context} positions). Use max_new_tokens <= "
            f"{context - longest_prompt}."
        )


def _eos_ids(eos_token_id: int | Iterable[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        ids: list[int] = []
    elif isinstance(eos_token_id, int):
        ids = [eos_token_id]
    else:
        ids = [int(i) for i in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=device)


def synchronize(device: torch.device) -> None:
    """Timers must not read before queued GPU work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Decoder:
    """Decoding state for one batch: the cached models, the active rows and their outputs."""

    def __init__(self, target, draft, input_ids, attention_mask, max_new_tokens, eos_token_id):
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
        attention_mask = _check_prompts(input_ids, attention_mask)
        longest = int(attention_mask.sum(dim=1).max())
        for model in (target, draft):
            if model is not None:
                _check_lengths(model, longest, max_new_tokens)
        self.device = target.device
        self.input_ids = input_ids.to(self.device)
        self.attention_mask = attention_mask.to(self.device)
        self.target, self.draft = target, draft
        self.max_new_tokens = max_new_tokens
        self.eos_ids = _eos_ids(eos_token_id, self.device)
        batch = input_ids.shape[0]
        self.vocab = max(
            m.get_output_embeddings().weight.shape[0] for m in (target, draft) if m is not None
        )
        self.active = torch.arange(batch, device=self.device)  # original index of each active row
        self.outputs: list[list[int]] = [[] for _ in range(batch)]
        self.finish_reasons = ["length"] * batch
        self.metrics = GenerationMetrics(rows=[], finish_reasons=self.finish_reasons)

    # -- shared pieces -----------------------------------------------------------------------

    def _prefill(self, model: PreTrainedModel) -> CachedModel:
        """Cache every prompt token but the last, which the first decoding call feeds."""
        cached = CachedModel(model, self.input_ids.shape[0], self.device)
        if self.input_ids.shape[1] > 1:
            cached.forward(self.input_ids[:, :-1], self.attention_mask[:, :-1], logits_to_keep=1)
        return cached

    def _remaining(self) -> torch.Tensor:
        lengths = [len(self.outputs[int(row)]) for row in self.active]
        return self.max_new_tokens - torch.tensor(lengths, device=self.device)

    def _emit(self, slot: int, tokens: list[int]) -> bool:
        """Append a row's new tokens, cut at its budget and first EOS; True when it is done."""
        row = int(self.active[slot])
        out = self.outputs[row]
        eos = set(self.eos_ids.tolist())
        for token in tokens:
            if len(out) >= self.max_new_tokens:
                break
            out.append(token)
            if token in eos:
                self.finish_reasons[row] = "eos"
                return True
        return len(out) >= self.max_new_tokens

    def _timed(self, fn, *args):
        synchronize(self.device)
        start = time.perf_counter()
        result = fn(*args)
        synchronize(self.device)
        return result, time.perf_counter() - start

    # -- autoregressive ----------------------------------------------------------------------

    def run_autoregressive(self, sampling: SamplingConfig, generator) -> GenerationResult:
        start = time.perf_counter()
        counts = [DecodeCounts() for _ in self.outputs]
        target = self._prefill(self.target)
        self.metrics.target_forward_passes += int(target.num_slots > 0)
        pending = self.input_ids[:, -1:]
        while self.active.numel():
            logits = target.forward(pending, torch.ones_like(pending), logits_to_keep=1)[:, -1]
            next_tokens = sample(warp(pad_vocab(logits, self.vocab), sampling), generator)
            self.metrics.target_forward_passes += 1
            done = []
            for slot, token in enumerate(next_tokens.tolist()):
                row = int(self.active[slot])
                counts[row].target_calls += 1
                done.append(self._emit(slot, [token]))
            pending = next_tokens.unsqueeze(1)
            pending = self._drop_finished(done, [target], pending)
        synchronize(self.device)
        return self._finish(counts, start)

    # -- speculative -------------------------------------------------------------------------

    def run_speculative(self, sampling, speculation, generator) -> GenerationResult:
        start = time.perf_counter()
        counts = [DecodeCounts(gamma=speculation.gamma) for _ in self.outputs]
        (target, draft), prefill_time = self._timed(
            lambda: (self._prefill(self.target), self._prefill(self.draft))
        )
        self.metrics.target_time_s += prefill_time
        passes = int(target.num_slots > 0)
        self.metrics.target_forward_passes += passes
        self.metrics.draft_forward_passes += passes
        last = self.input_ids[:, -1:]
        target_pending = last
        draft_pending, draft_valid = last, torch.ones_like(last)
        while self.active.numel():
            gamma = int(min(speculation.gamma, int(self._remaining().max()) - 1))
            (draft_tokens, draft_probs), draft_time = self._timed(
                self._draft_block, draft, draft_pending, draft_valid, gamma, sampling, generator
            )
            (outcome, target_probs), target_time = self._timed(
                self._verify_block,
                target,
                target_pending,
                draft_tokens,
                draft_probs,
                sampling,
                speculation,
                generator,
            )
            self.metrics.draft_time_s += draft_time
            self.metrics.target_time_s += target_time
            self.metrics.draft_forward_passes += gamma
            self.metrics.target_forward_passes += 1
            done = self._record_block(
                counts, gamma, draft_tokens, outcome, draft_probs, target_probs
            )
            if gamma > 0:  # gamma == 0 only on the last step: every row finishes in it
                draft.rollback((gamma - 1 - outcome.num_accepted).clamp(min=0))
            target_pending = outcome.next_tokens.unsqueeze(1)
            draft_pending, draft_valid = self._draft_inputs(draft_tokens, outcome, gamma)
            target_pending, draft_pending, draft_valid = self._drop_finished(
                done, [target, draft], target_pending, draft_pending, draft_valid
            )
        synchronize(self.device)
        return self._finish(counts, start)

    def _draft_block(self, draft: CachedModel, tokens, valid, gamma, sampling, generator):
        """Sample ``gamma`` tokens from the draft; return them and the q they came from."""
        drafted, probs = [], []
        for _ in range(gamma):
            logits = draft.forward(tokens, valid, logits_to_keep=1)[:, -1]
            draft_probs = warp(pad_vocab(logits, self.vocab), sampling)
            token = sample(draft_probs, generator)
            drafted.append(token)
            probs.append(draft_probs)
            tokens, valid = token.unsqueeze(1), torch.ones_like(token).unsqueeze(1)
        batch = tokens.shape[0]
        if not drafted:
            empty = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
            return empty, torch.zeros(batch, 0, self.vocab, device=self.device)
        return torch.stack(drafted, dim=1), torch.stack(probs, dim=1)

    def _verify_block(
        self,
        target: CachedModel,
        pending,
        draft_tokens,
        draft_probs,
        sampling,
        speculation,
        generator,
    ):
        """One target pass over ``[pending, x_1..x_g]``, the acceptance rule, target rollback."""
        inputs = torch.cat([pending, draft_tokens], dim=1)
        logits = target.forward(inputs, torch.ones_like(inputs))
        target_probs = warp(pad_vocab(logits, self.vocab), sampling)
        outcome = verify(
            draft_tokens,
            draft_probs,
            target_probs,
            lenience=speculation.lenience,
            epsilon=speculation.epsilon,
            generator=generator,
        )
        target.rollback(draft_tokens.shape[1] - outcome.num_accepted)
        return outcome, target_probs

    def _draft_inputs(self, draft_tokens, outcome, gamma):
        """What the draft must see before its next proposal: x_g when all were accepted, then
        the new token. Rows with only one pending token get a masked dummy slot on the left."""
        new = outcome.next_tokens.unsqueeze(1)
        if gamma == 0:
            return new, torch.ones_like(new)
        all_accepted = (outcome.num_accepted == gamma).unsqueeze(1)
        if not bool(all_accepted.any()):
            return new, torch.ones_like(new)
        tokens = torch.cat([draft_tokens[:, -1:], new], dim=1)
        valid = torch.cat([all_accepted, torch.ones_like(all_accepted)], dim=1).long()
        return tokens, valid

    def _record_block(self, counts, gamma, draft_tokens, outcome, draft_probs, target_probs):
        """Emit each row's tokens and update its counts; returns which rows are finished."""
        verified = (outcome.num_accepted + 1).clamp(max=gamma)  # positions with accepted prefix
        alpha = analytic_acceptance(target_probs[:, :gamma], draft_probs)
        in_prefix = torch.arange(gamma, device=self.device).unsqueeze(0) < verified.unsqueeze(1)
        alpha_sums = (alpha * in_prefix).sum(dim=1).tolist()
        done = []
        accepted = outcome.num_accepted.tolist()
        drafted_rows, next_tokens = draft_tokens.tolist(), outcome.next_tokens.tolist()
        for slot, n in enumerate(accepted):
            row = int(self.active[slot])
            counts[row].record_block(gamma, n, alpha_sums[slot], min(n + 1, gamma))
            counts[row].draft_calls += gamma
            done.append(self._emit(slot, drafted_rows[slot][:n] + [next_tokens[slot]]))
        return done

    # -- bookkeeping -------------------------------------------------------------------------

    def _drop_finished(self, done: list[bool], cached: list[CachedModel], *tensors):
        """Remove finished rows from the caches, the active set and per-row tensors."""
        if not any(done):
            return tensors if len(tensors) > 1 else tensors[0]
        keep = torch.tensor([not d for d in done], device=self.device).nonzero().squeeze(1)
        self.active = self.active[keep]
        if keep.numel():
            for model in cached:
                model.select_rows(keep)
        kept = tuple(t[keep] for t in tensors)
        return kept if len(kept) > 1 else kept[0]

    def _finish(self, counts: list[DecodeCounts], start: float) -> GenerationResult:
        for row, out in enumerate(self.outputs):
            counts[row].new_tokens = len(out)
        self.metrics.rows = counts
        self.metrics.wall_time_s = time.perf_counter() - start
        return GenerationResult(sequences=self.outputs, metrics=self.metrics)

"""Logit warping and sampling: pure tensor functions shared by the draft and the target.

One ``warp`` turns logits into the exact distribution a token is drawn from. Greedy decoding
(temperature 0) is the one-hot distribution on the argmax, never ``softmax(logits)``: that is what
makes greedy speculative decoding reproduce the target's greedy output token for token.
All probability math is float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distillspec.decoding.params import SamplingConfig


def warp(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Next-token probabilities ``[..., V]`` (float32) after temperature, top-k and top-p.

    Order as in ``transformers``: divide by the temperature, keep the ``top_k`` largest logits,
    then keep the smallest prefix of the sorted distribution whose mass reaches ``top_p``
    (the most likely token is always kept). Temperature 0 gives ``one_hot(argmax(logits))``.
    """
    logits = logits.float()
    if sampling.greedy:
        return one_hot_argmax(logits)
    logits = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        probs = _top_p_filter(probs, sampling.top_p)
    return probs


def tempered_probs(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """``warp`` for rows without top-k or top-p, their temperatures a tensor ``[B]``:
    softmax(logits [B, ..., V] / T_row) in float32 (a tensor, so a compiled caller makes no new
    graph for a new temperature). Temperatures must be > 0."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    return torch.softmax(logits.float() / temperatures.view(shape), dim=-1)


def warp_rows(logits: torch.Tensor, samplings: Sequence[SamplingConfig]) -> torch.Tensor:
    """``warp`` with one SamplingConfig per row of ``logits [B, ..., V]``.

    Rows that share a config are warped together (one call per distinct config).
    """
    if len(set(samplings)) == 1:
        return warp(logits, samplings[0])
    probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    groups: dict[SamplingConfig, list[int]] = {}
    for row, sampling in enumerate(samplings):
        groups.setdefault(sampling, []).append(row)
    for sampling, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        probs[index] = warp(logits[index], sampling)
    return probs


def pad_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Pad logits with -inf to ``width`` columns: ids a model lacks get probability exactly 0.

    Embedding matrices are often padded to different sizes; padding the *distributions* with
    zeros keeps speculative decoding exactly lossless with respect to the target.
    """
    missing = width - logits.shape[-1]
    if missing <= 0:
        return logits
    return torch.nn.functional.pad(logits, (0, missing), value=float("-inf"))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax over the last dim, first index on ties (like ``torch.argmax``).

    ``max(...).indices`` is the same index and several times faster on CPU (bf16 argmax is not
    vectorised): on a 49k vocabulary it is a visible part of a small draft's step.
    """
    return logits.max(dim=-1).indices


def kept_columns(logits: torch.Tensor, kept_ids: torch.Tensor | None) -> torch.Tensor:
    """``logits [..., V]`` restricted to ``kept_ids [K]`` (``[..., K]``), or as they are when
    ``kept_ids`` is None. A pruned draft head's logits are -inf outside its kept ids, so a
    maximum, a top-k or a log-softmax over the kept columns is the one over the whole row,
    at K/V of the work (the row's full width stays for the sampled rows' q)."""
    return logits if kept_ids is None else logits.index_select(-1, kept_ids)


def kept_for_top(kept_ids: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """``kept_ids`` where a top-``k`` can be taken over them (at least ``k`` ids), else None:
    the whole row."""
    return kept_ids if kept_ids is not None and kept_ids.numel() >= k else None


def full_ids(indices: torch.Tensor, kept_ids: torch.Tensor | None) -> torch.Tensor:
    """Column indices of ``kept_columns`` back to token ids."""
    return indices if kept_ids is None else kept_ids[indices]


def draft_greedy_tokens(logits: torch.Tensor, kept_ids: torch.Tensor | None) -> torch.Tensor:
    """The draft's argmax over the last dim (``greedy_tokens``) from its kept columns."""
    return full_ids(greedy_tokens(kept_columns(logits, kept_ids)), kept_ids)


def top_ids(logits: torch.Tensor, k: int, kept_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The ids of the ``k`` largest logits, ``[..., k]`` in descending order, taken over the
    kept columns when there are at least ``k`` of them (``kept_columns``)."""
    kept_ids = kept_for_top(kept_ids, k)
    top = torch.topk(kept_columns(logits, kept_ids).float(), k, dim=-1).indices
    return full_ids(top, kept_ids)


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy distribution: 1 on the argmax (first index on ties, like ``torch.argmax``)."""
    probs = torch.zeros_like(logits, dtype=torch.float32)
    return probs.scatter_(-1, greedy_tokens(logits).unsqueeze(-1), 1.0)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the nucleus and renormalise.

    A token is dropped when the mass of strictly more likely tokens already reaches ``top_p``.
    """
    sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False  # never drop the most likely token
    drop = torch.zeros_like(drop_sorted).scatter_(-1, sorted_idx, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(
    probs: torch.Tensor,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token id per row of ``probs [..., V]``; returns ``[...]`` int64.

    With ``uniforms [...]`` in [0, 1) the draw is the inverse CDF at ``u * total mass``: the
    first id whose cumulative mass exceeds it, which always has positive probability (so a
    one-hot row gives its argmax). The engine uses this so each row can draw from its own
    seeded generator. Without ``uniforms`` it is ``torch.multinomial`` with ``generator``.
    """
    if uniforms is None:
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, num_samples=1, generator=generator)
        return tokens.reshape(probs.shape[:-1])
    cdf = probs.float().cumsum(dim=-1)
    point = (uniforms.unsqueeze(-1) * cdf[..., -1:]).contiguous()
    tokens = torch.searchsorted(cdf.contiguous(), point, right=True).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


def sample_without_replacement(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``k`` distinct ids per row of ``probs [..., V]``, in draw order; returns ``[..., k]``.

    Draw j is ``sample`` at ``uniforms[..., j]`` from ``probs`` with draws 1..j-1 set to 0
    (renormalised: ``sample`` scales the uniform by the mass left), i.e. q_j(x) =
    q(x) / (1 - sum_{i<j} q(x_i)) off the earlier draws. Where the earlier draws used up every
    id of positive mass, draw j is meaningless (id V - 1); ``acceptance.verify_tree`` sees the
    same exhausted mass and never tests it.
    """
    remaining = probs.float().clone()
    tokens = []
    for column in range(uniforms.shape[-1]):
        token = sample(remaining, uniforms=uniforms[..., column])
        remaining.scatter_(-1, token.unsqueeze(-1), 0.0)
        tokens.append(token)
    return torch.stack(tokens, dim=-1)

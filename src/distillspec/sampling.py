"""Logit warping and sampling: pure tensor functions shared by the draft and the target.

One ``warp`` turns logits into the exact distribution a token is drawn from. Greedy decoding
(temperature 0) is the one-hot distribution on the argmax, never ``softmax(logits)``: that is what
makes greedy speculative decoding reproduce the target's greedy output token for token.
All probability math is float32.
"""

from __future__ import annotations

import torch

from distillspec.config import SamplingConfig


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


def pad_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Pad logits with -inf to ``width`` columns: ids a model lacks get probability exactly 0.

    Embedding matrices are often padded to different sizes; padding the *distributions* with
    zeros keeps speculative decoding exactly lossless with respect to the target.
    """
    missing = width - logits.shape[-1]
    if missing <= 0:
        return logits
    return torch.nn.functional.pad(logits, (0, missing), value=float("-inf"))


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy distribution: 1 on ``argmax`` (first index on ties, like ``torch.argmax``)."""
    probs = torch.zeros_like(logits, dtype=torch.float32)
    return probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)


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


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row of ``probs [..., V]``; returns ``[...]`` int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, num_samples=1, generator=generator)
    return tokens.reshape(probs.shape[:-1])

"""Token-level divergences for DistillSpec training, as pure tensor functions, and their reductions.

Notation (DistillSpec; Leviathan et al. 2023): P = target, Q = draft; sums run over the
vocabulary. Every divergence takes ``(draft_logits, target_logits)`` of shape ``[B, T, V]`` (any
leading dims, any float dtype) and returns the per-token values ``[B, T]`` in float32:

    fkl   KL(P || Q) = sum P (log P - log Q)          forward KL: mass-covering
    rkl   KL(Q || P) = sum Q (log Q - log P)          reverse KL: mode-seeking
    jsd   beta KL(P || M) + (1 - beta) KL(Q || M),    M = beta P + (1 - beta) Q  (GKD, Eq. 1)
    tvd   1/2 sum |P - Q|  =  1 - sum min(P, Q)       = 1 - (per-token acceptance of SD)

Beware of ``torch.nn.functional.kl_div(input, target)``: it computes KL(target || input), the
reverse of its argument order. Nothing here calls it.

Shared conventions:

- Both logits are divided by the same ``temperature`` (> 0) before the softmax. No T^2 rescaling.
- Vocabulary widths may differ (embedding rows padded to a multiple of 64, say): ``align_vocab``
  pads the narrower logits with -inf, so ids one model lacks get probability exactly 0.
- Logits may contain -inf (masked ids, one-hot targets). Values and gradients stay finite:
  0 log 0 is 0, and a log-probability of exactly -inf (probability exactly 0) is replaced by
  ``LOG_PROB_FLOOR = log(1e-30)`` before it is used. Where P > 0 but Q = 0 the forward KL is
  truly infinite; it comes out as the finite P (log P - log 1e-30), about P (log P + 69.1), with no
  gradient through that id (the draft has no logit to move there). The same holds for the reverse
  KL where Q > 0 but P = 0: the draft is pushed off that id with weight log P - log(1e-30).
  Finite log-probabilities, however small, are used exactly, gradient included.
- Every row must hold at least one finite logit (an all -inf row has no distribution).
- The target carries no gradient in training: call the target under ``torch.no_grad()``. These
  functions do not detach anything themselves.

Reduction is separate (``reduce_per_sequence``, ``reduce_per_token``, ``masked_sum``): the mask
is 0/1 or bool, built by the caller from positions, never from token ids.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch

from distillspec.decoding.sampling import pad_vocab

LOG_PROB_FLOOR = math.log(1e-30)
"""Stand-in for log 0 wherever a probability is exactly 0 (about -69.08)."""

Divergence = Callable[..., torch.Tensor]


def align_vocab(
    draft_logits: torch.Tensor, target_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the narrower of ``[..., V_draft]`` / ``[..., V_target]`` with -inf to the wider width.

    The padded ids get probability exactly 0 under that model. Returns ``(draft, target)``.
    """
    if draft_logits.shape[:-1] != target_logits.shape[:-1]:
        raise ValueError(
            f"draft_logits {tuple(draft_logits.shape)} and target_logits "
            f"{tuple(target_logits.shape)} differ before the vocabulary dimension. "
            "Score the same positions with both models (same batch and sequence length)."
        )
    width = max(draft_logits.shape[-1], target_logits.shape[-1])
    return pad_vocab(draft_logits, width), pad_vocab(target_logits, width)


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(
            f"temperature must be a positive finite number, got {temperature}. Both logits are "
            "divided by it before the softmax; use 1.0 to compare the raw distributions."
        )


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"beta must be in [0, 1], got {beta}. It is the target's weight in the mixture "
            "M = beta P + (1 - beta) Q; use 0.5 for the symmetric Jensen-Shannon divergence."
        )


def _log_probs(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(draft_log_probs, target_log_probs)`` after vocab alignment and temperature."""
    _check_temperature(temperature)
    draft_logits, target_logits = align_vocab(draft_logits, target_logits)
    draft_log_probs = torch.log_softmax(draft_logits.float() / temperature, dim=-1)
    target_log_probs = torch.log_softmax(target_logits.float() / temperature, dim=-1)
    return draft_log_probs, target_log_probs


def _floor_log(log_probs: torch.Tensor) -> torch.Tensor:
    """Replace log 0 = -inf by ``LOG_PROB_FLOOR``; finite values pass unchanged (gradient too).

    ``torch.where`` sends a zero gradient to the replaced entries, and log_softmax's backward
    turns that zero into zero (its factor there is exp(-inf) = 0), so no NaN appears.
    """
    return torch.where(torch.isfinite(log_probs), log_probs, LOG_PROB_FLOOR)


def _kl(log_probs_a: torch.Tensor, log_probs_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) = sum A (log A - log B) over the last dim, with 0 log 0 = 0.

    A = exp(log_probs_a) is exactly 0 where log_probs_a is -inf, so the floored difference there
    is multiplied by 0 and contributes 0 to the value and the gradient.
    """
    probs_a = log_probs_a.exp()
    return (probs_a * (_floor_log(log_probs_a) - _floor_log(log_probs_b))).sum(dim=-1)


def forward_kl(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL(P || Q) = sum_v P (log P - log Q), P = target, Q = draft: ``[..., V] -> [...]``.

    Mass-covering: penalises the draft for missing target mass. Infinite where P > 0 and Q = 0;
    there log Q is taken as log(1e-30) (see the module docstring).
    """
    draft_log_probs, target_log_probs = _log_probs(draft_logits, target_logits, temperature)
    return _kl(target_log_probs, draft_log_probs)


def reverse_kl(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Reverse KL(Q || P) = sum_v Q (log Q - log P), P = target, Q = draft: ``[..., V] -> [...]``.

    Mode-seeking: penalises draft mass where the target has little. Infinite where Q > 0 and
    P = 0; there log P is taken as log(1e-30) (see the module docstring).
    """
    draft_log_probs, target_log_probs = _log_probs(draft_logits, target_logits, temperature)
    return _kl(draft_log_probs, target_log_probs)


def jsd(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Generalised JSD (GKD): beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.

    P = target, Q = draft, ``[..., V] -> [...]``. beta = 0.5 is the classic Jensen-Shannon
    divergence (at most log 2). For small beta it is about beta * KL(P || Q); for beta near 1
    about (1 - beta) * KL(Q || P). It is bounded (KL(P || M) <= -log beta), so no id makes it
    infinite.

    Endpoints: at beta = 0, M = Q and the weight on KL(P || M) is 0; at beta = 1, M = P and the
    weight on KL(Q || M) is 0. The formula is therefore identically 0 at both ends, and this
    function returns exactly 0 there (with a zero gradient). TRL's GKD trainer special-cases
    beta = 0 as forward KL and beta = 1 as reverse KL instead; here use ``forward_kl`` /
    ``reverse_kl`` ("fkl" / "rkl") for those.
    """
    _check_beta(beta)
    draft_log_probs, target_log_probs = _log_probs(draft_logits, target_logits, temperature)
    # log M = logsumexp(log beta + log P, log(1 - beta) + log Q), on floored (finite) logs so the
    # logsumexp never sees two -inf (whose backward is NaN). At an endpoint one weight is log 0 =
    # -inf and log M is exactly the other side's log-probability.
    log_weights = (_log_or_neg_inf(beta), _log_or_neg_inf(1.0 - beta))
    mixture_log_probs = torch.logsumexp(
        torch.stack(
            (
                _floor_log(target_log_probs) + log_weights[0],
                _floor_log(draft_log_probs) + log_weights[1],
            )
        ),
        dim=0,
    )
    return beta * _kl(target_log_probs, mixture_log_probs) + (1.0 - beta) * _kl(
        draft_log_probs, mixture_log_probs
    )


def _log_or_neg_inf(weight: float) -> float:
    return math.log(weight) if weight > 0.0 else float("-inf")


def tvd(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Total variation distance 1/2 sum_v |P - Q| = 1 - sum_v min(P, Q): ``[..., V] -> [...]``.

    Symmetric, in [0, 1]; 1 - TVD is the speculative-decoding acceptance probability of the
    position. Computed as the half-L1 form (no cancellation when P and Q are close).
    """
    draft_log_probs, target_log_probs = _log_probs(draft_logits, target_logits, temperature)
    return 0.5 * (target_log_probs.exp() - draft_log_probs.exp()).abs().sum(dim=-1)


def sparse_forward_kl(
    draft_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_log_probs: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL(P_k || Q) against a *cached top-k* of the target: ``[..., V], [..., k] -> [...]``.

    P is known on k ids per position (``target_ids``, with log-probabilities at temperature 1)
    and renormalised over them at ``temperature``: P_k = softmax(log p / T) over the k entries;
    an entry with log-probability -inf is absent (it weighs ~1e-30; a position with no entry
    at all gets a meaningless value and must be masked by the caller). Q = softmax(draft_logits
    / T) over the whole (draft) vocabulary, so mass the draft puts outside the top-k is still
    penalised through the normaliser. With k = V this is ``forward_kl`` exactly.
    """
    _check_temperature(temperature)
    draft_log_probs = torch.log_softmax(draft_logits.float() / temperature, dim=-1)
    cached = _floor_log(target_log_probs.float())  # absent entries: ~0 weight, never NaN
    target_log_probs = torch.log_softmax(cached / temperature, dim=-1)
    draft_at_ids = draft_log_probs.gather(-1, target_ids.clamp(min=0).long())
    probs = target_log_probs.exp()
    return (probs * (_floor_log(target_log_probs) - _floor_log(draft_at_ids))).sum(dim=-1)


DIVERGENCES: dict[str, Divergence] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
}


def get_divergence(name: str, **kwargs: float) -> Divergence:
    """The divergence registered as ``name``, with its options (``beta``, ``temperature``) bound.

    Options are validated now, so a bad config fails before training starts. The result is called
    as ``divergence(draft_logits, target_logits) -> [B, T]``.
    """
    if name not in DIVERGENCES:
        raise ValueError(
            f"unknown divergence {name!r}. Valid names: {', '.join(sorted(DIVERGENCES))} "
            "(fkl = KL(target || draft), rkl = KL(draft || target), jsd = generalised JSD(beta), "
            "tvd = total variation)."
        )
    divergence = DIVERGENCES[name]
    options = [
        parameter.name
        for parameter in inspect.signature(divergence).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(f"divergence {name!r} takes no option(s) {unknown}; it accepts {options}.")
    if "temperature" in kwargs:
        _check_temperature(kwargs["temperature"])
    if "beta" in kwargs:
        _check_beta(kwargs["beta"])
    return functools.partial(divergence, **kwargs) if kwargs else divergence


def _check_mask(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != per_token.shape:
        raise ValueError(
            f"mask {tuple(mask.shape)} must have the shape of the per-token values "
            f"{tuple(per_token.shape)}: one 0/1 entry per scored position."
        )
    return mask.to(torch.bool)


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``per_token`` over positions where ``mask`` is set (0/1 or bool): a scalar.

    Masked-out positions are dropped with ``torch.where``, not multiplied by 0, so garbage there
    (even inf or NaN) cannot leak into the value or the gradient.
    """
    keep = _check_mask(per_token, mask)
    return torch.where(keep, per_token, 0.0).sum()


def reduce_per_token(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-normalised mean: ``masked_sum(per_token, mask) / mask.sum()`` (0 if nothing is set).

    This is the reduction that makes gradient accumulation exact. Count the real tokens of the
    whole optimiser step first (``n = sum over micro-batches of mask.sum()``, after generation,
    because on-policy lengths vary), then use ``masked_sum(micro_per_token, micro_mask) / n`` as
    each micro-batch's loss: the accumulated gradient is then that of ``reduce_per_token`` on the
    full batch, so batch 8 x accumulation 1 equals batch 1 x accumulation 8. Averaging each
    micro-batch's own mean instead weights tokens of short micro-batches more.
    """
    count = _check_mask(per_token, mask).sum()
    return masked_sum(per_token, mask) / count.clamp_min(1)


def reduce_per_sequence(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's reduction: mean over each sequence's masked tokens, then over sequences.

    ``[B, T]`` values and mask -> scalar ``mean_b (1/|y_b|) sum_t per_token[b, t]`` over the
    rows with at least one set position; rows with none are ignored (0 if no row has any).
    Every sequence counts equally whatever its length.
    """
    keep = _check_mask(per_token, mask)
    token_counts = keep.sum(dim=-1)
    sequence_means = torch.where(keep, per_token, 0.0).sum(dim=-1) / token_counts.clamp_min(1)
    num_sequences = (token_counts > 0).sum()
    return sequence_means.sum() / num_sequences.clamp_min(1)

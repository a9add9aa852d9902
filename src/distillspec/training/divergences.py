"""Token-level divergences for DistillSpec training, as pure tensor functions, and their reductions.

Notation (DistillSpec; Leviathan et al. 2023): P = target, Q = draft; sums run over the
vocabulary. Every divergence takes ``(draft_logits, target_logits)`` of shape ``[B, T, V]`` (any
leading dims, any float dtype) and returns the per-token values ``[B, T]`` in float32:

    fkl   KL(P || Q) = sum P (log P - log Q)          forward KL: mass-covering
    rkl   KL(Q || P) = sum Q (log Q - log P)          reverse KL: mode-seeking
    jsd   beta KL(P || M) + (1 - beta) KL(Q || M),    M = beta P + (1 - beta) Q  (GKD, Eq. 1)
    tvd   1/2 sum |P - Q|  =  1 - sum min(P, Q)       = 1 - (per-token acceptance of SD)
    lk    (1 - w) (-log sum min(P, Q)) + w KL(P || Q)  -log of the acceptance, mixed with fkl by w

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

Against a cached top-k of the target (``sparse_divergence``): ``fkl`` keeps the target
renormalised over its k ids (``sparse_forward_kl``); every other divergence runs on k + 1
categories, the k cached ids plus one tail bucket (``tail_bucket_log_probs``).

Reduction is separate (``reduce_per_sequence``, ``reduce_per_token``, ``masked_sum``): the mask
is 0/1 or bool, built by the caller from positions, never from token ids. ``filter_tokens``
(AdaSPEC) narrows such a mask to the tokens a reference draft learned and this draft has not.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch

from distillspec.decoding.sampling import pad_vocab

TAIL_ID = -2
"""The id of a cached top-k's extra column that holds the target's tail log-mass (the exact
logsumexp over the ids not in its top k, written by ``teacher_topk``); -1 marks absent entries."""

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


def _check_kl_weight(kl_weight: float) -> None:
    if not 0.0 <= kl_weight <= 1.0:
        raise ValueError(
            f"kl_weight must be in [0, 1], got {kl_weight}. It mixes forward KL into the lk loss, "
            "(1 - kl_weight) lk + kl_weight fkl; use 0 for the pure acceptance loss."
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


def lk(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    kl_weight: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Acceptance loss (1 - w) (-log sum_v min(P, Q)) + w KL(P || Q), P = target, Q = draft.

    ``[..., V] -> [...]``; w = ``kl_weight`` in [0, 1]. sum_v min(P, Q) = 1 - TVD is the
    speculative-decoding acceptance probability of the position, so the first term is
    -log(acceptance) ("LK" loss): 0 at Q = P, and its gradient does not vanish where the
    overlap is small, unlike TVD's. At a one-hot P on id a the overlap is Q(a): lk is then the
    cross-entropy -log Q(a).

    Floor: the overlap is computed in log space, logsumexp_v min(log P, log Q), with each
    log-probability floored at log(1e-30) like everywhere in this module. It never underflows,
    and for disjoint supports it is V * 1e-30 instead of 0, so the -log term is at most
    -log(1e-30) ~ 69.1 and values and gradients stay finite (floored entries pass no gradient).
    """
    _check_kl_weight(kl_weight)
    draft_log_probs, target_log_probs = _log_probs(draft_logits, target_logits, temperature)
    overlap_log = torch.logsumexp(
        torch.minimum(_floor_log(target_log_probs), _floor_log(draft_log_probs)), dim=-1
    )
    acceptance_loss = -overlap_log
    if kl_weight == 0.0:
        return acceptance_loss
    forward = _kl(target_log_probs, draft_log_probs)
    return (1.0 - kl_weight) * acceptance_loss + kl_weight * forward


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
    listed = target_log_probs.float().masked_fill(target_ids < 0, float("-inf"))  # no tail column
    cached = _floor_log(listed)  # absent entries: ~0 weight, never NaN
    target_log_probs = torch.log_softmax(cached / temperature, dim=-1)
    draft_at_ids = draft_log_probs.gather(-1, target_ids.clamp(min=0).long())
    probs = target_log_probs.exp()
    return (probs * (_floor_log(target_log_probs) - _floor_log(draft_at_ids))).sum(dim=-1)


def tail_bucket_log_probs(
    draft_logits: torch.Tensor, target_ids: torch.Tensor, target_log_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over k + 1 categories: the target's k cached ids, then one tail bucket.

    ``[..., V], [..., k], [..., k] -> ([..., k + 1], [..., k + 1])`` float32
    ``(draft_log_probs, target_log_probs)``, each normalised (temperature 1):

    - target P: its k cached log-probabilities (full-softmax values at temperature 1, as
      ``teacher_topk`` stores them), then its tail: the exact log-mass of the other ids where
      the cache has a ``TAIL_ID`` column (``teacher_topk`` writes one), else log(1 - sum_k P)
      clamped at mass 0 (which rounds a tail below ~1e-7 to 0, and so overstates rkl);
    - draft Q: log_softmax(draft_logits) at those ids, then the log of its mass on every other
      id (logsumexp over the vocabulary with the listed ids removed: no cancellation).

    An absent entry (id < 0, log-probability -inf; a position with nothing cached, or an id a
    pruned head lacks) is -inf on both sides and takes nothing from the draft's tail. An id the
    draft's vocabulary lacks (>= V) keeps its target mass and gets Q = 0. At k = V (every id
    listed) the tail is empty on both sides, up to the rounding of the cached log-probs
    (float16 in the cache: a target tail of order 1e-4 may remain).
    """
    draft_log_probs = torch.log_softmax(draft_logits.float(), dim=-1)
    width = draft_log_probs.shape[-1]
    target_ids = target_ids.long()
    present = target_ids >= 0
    # One spare -inf column takes the absent ids and those beyond the draft's vocabulary.
    index = torch.where(present & (target_ids < width), target_ids, width)
    spare = draft_log_probs.new_full((*draft_log_probs.shape[:-1], 1), float("-inf"))
    padded = torch.cat((draft_log_probs, spare), dim=-1)
    draft_at_ids = padded.gather(-1, index)
    draft_tail = _logsumexp_or_neg_inf(padded.scatter(-1, index, float("-inf")))
    cached = target_log_probs.float().masked_fill(~present, float("-inf"))
    is_tail = target_ids == TAIL_ID
    stored_tail = _logsumexp_or_neg_inf(target_log_probs.float().masked_fill(~is_tail, -math.inf))
    estimated_tail = (1.0 - cached.exp().sum(dim=-1)).clamp_min(0.0).log()
    target_tail = torch.where(is_tail.any(dim=-1), stored_tail, estimated_tail)
    return (
        torch.cat((draft_at_ids, draft_tail.unsqueeze(-1)), dim=-1),
        torch.cat((cached, target_tail.unsqueeze(-1)), dim=-1),
    )


def _logsumexp_or_neg_inf(log_probs: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim; exactly -inf, with a zero gradient (not NaN), where every
    entry is -inf (torch's own backward gives NaN there)."""
    empty = torch.isneginf(log_probs).all(dim=-1)
    safe = log_probs.masked_fill(empty.unsqueeze(-1), 0.0)
    return torch.where(empty, float("-inf"), torch.logsumexp(safe, dim=-1))


def tail_bucket_divergence(
    divergence: Divergence,
    draft_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_log_probs: torch.Tensor,
) -> torch.Tensor:
    """``divergence`` (a dense one, at temperature 1) on the k + 1 tail-bucket categories.

    ``[..., V], [..., k], [..., k] -> [...]``. The dense functions take logits and apply
    log_softmax, which leaves normalised log-probabilities unchanged, so they run on
    ``tail_bucket_log_probs`` as they are. Exact at k = V. At smaller k the tail ids are merged
    into one category, which can only lower an f-divergence (fkl, rkl, jsd, tvd; data
    processing) and raise the overlap: with t_P, t_Q the two tail masses, full TVD - bucket TVD
    lies in [0, min(t_P, t_Q)]; the KLs lose exactly t_P KL(P|tail || Q|tail) (fkl) and
    t_Q KL(Q|tail || P|tail) (rkl); jsd loses at most (beta t_P + (1 - beta) t_Q) log 2.
    """
    if _temperature_of(divergence) != 1.0:
        raise ValueError(_TAIL_TEMPERATURE_ERROR)
    draft_log_probs, target_log_probs = tail_bucket_log_probs(
        draft_logits, target_ids, target_log_probs
    )
    return divergence(draft_log_probs, target_log_probs)


_TAIL_TEMPERATURE_ERROR = (
    "A divergence other than fkl against the cached top-k (teacher_topk) needs loss temperature "
    "1: the cache holds the target's log-probabilities at temperature 1, and its tail bucket's "
    "mass at another temperature depends on the uncached ids. Use loss_temperature 1, divergence "
    "fkl (the target renormalised over its k ids, at any temperature), or teacher_topk 0."
)


def _temperature_of(divergence: Divergence) -> float:
    return getattr(divergence, "keywords", {}).get("temperature", 1.0)


def sparse_divergence(divergence: Divergence) -> Callable[..., torch.Tensor]:
    """The cached-top-k form of ``divergence`` (as ``get_divergence`` returns it), called as
    ``(draft_logits, target_ids, target_log_probs) -> [...]``.

    ``forward_kl`` becomes ``sparse_forward_kl`` (the target renormalised over its k ids, any
    temperature; the recipe the demo was tuned with); every other divergence, options bound,
    runs on the k + 1 tail-bucket categories (``tail_bucket_divergence``), and refuses a
    temperature other than 1 with a ValueError (the tail's mass at T != 1 is not in the cache).
    For the tail-bucket forward KL use ``lk`` with ``kl_weight=1``.
    """
    function = getattr(divergence, "func", divergence)
    options = dict(getattr(divergence, "keywords", {}))
    if function is forward_kl:
        return functools.partial(sparse_forward_kl, temperature=options.get("temperature", 1.0))
    if options.pop("temperature", 1.0) != 1.0:
        raise ValueError(_TAIL_TEMPERATURE_ERROR)
    return functools.partial(tail_bucket_divergence, functools.partial(function, **options))


DIVERGENCES: dict[str, Divergence] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "lk": lk,
}


def get_divergence(name: str, **kwargs: float) -> Divergence:
    """The divergence registered as ``name``, with its options (``beta``, ``kl_weight``,
    ``temperature``) bound.

    Options are validated now, so a bad config fails before training starts. The result is called
    as ``divergence(draft_logits, target_logits) -> [B, T]``.
    """
    if name not in DIVERGENCES:
        raise ValueError(
            f"unknown divergence {name!r}. Valid names: {', '.join(sorted(DIVERGENCES))} "
            "(fkl = KL(target || draft), rkl = KL(draft || target), jsd = generalised JSD(beta), "
            "tvd = total variation, lk = -log acceptance mixed with fkl by kl_weight)."
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
    if "kl_weight" in kwargs:
        _check_kl_weight(kwargs["kl_weight"])
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


def kept_token_count(num_tokens: int, keep_fraction: float) -> int:
    """How many of ``num_tokens`` tokens ``filter_tokens`` keeps: ceil(keep_fraction * n).

    Rounded up, so any n > 0 keeps at least one token and 1.0 keeps all; the product is first
    rounded to 6 decimals, so 0.7 * 10 (7.000000000000001 in floating point) keeps 7, not 8.
    """
    _check_keep_fraction(keep_fraction)
    return math.ceil(round(keep_fraction * num_tokens, 6))


def _check_keep_fraction(keep_fraction: float) -> None:
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(
            f"keep_fraction must be in (0, 1], got {keep_fraction}: it is the fraction of the "
            "scored tokens kept in the loss; 1.0 keeps every token (no filtering)."
        )


def filter_tokens(
    draft_per_token: torch.Tensor,
    reference_per_token: torch.Tensor,
    mask: torch.Tensor,
    keep_fraction: float,
) -> torch.Tensor:
    """AdaSPEC's token filter: the tokens a reference draft learned and this draft has not.

    All ``[B, T]``: per-token divergences to the target of the draft being trained and of a
    reference draft (already distilled for this target), and the 0/1 or bool loss mask.
    Returns a bool mask that keeps the ``kept_token_count(n, keep_fraction)`` masked-in tokens
    (n of them) with the largest gap draft - reference; ties go to the earlier position
    (row-major), so the choice is deterministic. Tokens where even the reference stays far from
    the target (small or negative gap) are dropped as ones the draft cannot learn. Values must
    be finite at masked-in positions; masked-out ones are never looked at.
    """
    keep = _check_mask(draft_per_token, mask)
    if reference_per_token.shape != draft_per_token.shape:
        raise ValueError(
            f"reference_per_token {tuple(reference_per_token.shape)} must have the shape of "
            f"draft_per_token {tuple(draft_per_token.shape)}: score the same positions."
        )
    positions = keep.flatten().nonzero().squeeze(-1)
    count = kept_token_count(positions.numel(), keep_fraction)
    gap = (draft_per_token.detach().float() - reference_per_token.detach().float()).flatten()
    order = torch.sort(gap[positions], descending=True, stable=True).indices[:count]
    kept = torch.zeros_like(keep.flatten())
    kept[positions[order]] = True
    return kept.view_as(keep)

"""Divergences and reductions against hand computations (math.log on small lists, or float64 sums).

P = target, Q = draft throughout. No models: every test runs in milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from distillspec.training.divergences import (
    DIVERGENCES,
    LOG_PROB_FLOOR,
    TAIL_ID,
    align_vocab,
    filter_tokens,
    forward_kl,
    get_divergence,
    jsd,
    kept_token_count,
    lk,
    masked_sum,
    reduce_per_sequence,
    reduce_per_token,
    reverse_kl,
    sparse_divergence,
    sparse_forward_kl,
    tail_bucket_divergence,
    tail_bucket_log_probs,
    tvd,
)

NEG_INF = float("-inf")
ALL_NAMES = ("fkl", "rkl", "jsd", "tvd", "lk")


def logits_of(probs: list[float]) -> torch.Tensor:
    """``[1, 1, V]`` logits whose softmax is ``probs`` (log 0 = -inf)."""
    return torch.tensor([[probs]], dtype=torch.float64).log()


def kl_hand(a: list[float], b: list[float]) -> float:
    """KL(a || b) with 0 log 0 = 0 and log 0 in b replaced by the documented floor log(1e-30)."""
    total = 0.0
    for a_i, b_i in zip(a, b, strict=True):
        if a_i > 0:
            total += a_i * (math.log(a_i) - (math.log(b_i) if b_i > 0 else math.log(1e-30)))
    return total


def jsd_hand(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * p_i + (1 - beta) * q_i for p_i, q_i in zip(p, q, strict=True)]
    return beta * kl_hand(p, m) + (1 - beta) * kl_hand(q, m)


def tvd_hand(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(p_i - q_i) for p_i, q_i in zip(p, q, strict=True))


def lk_hand(p: list[float], q: list[float], kl_weight: float = 0.0) -> float:
    """-log sum min(p, q) with each probability floored at 1e-30 (the documented floor)."""
    overlap = sum(min(max(p_i, 1e-30), max(q_i, 1e-30)) for p_i, q_i in zip(p, q, strict=True))
    return (1 - kl_weight) * -math.log(overlap) + kl_weight * kl_hand(p, q)


def softmax64(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=-1)


def kl64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim for strictly positive float64 distributions."""
    return (a * (a.log() - b.log())).sum(dim=-1)


def value(name: str, draft_logits: torch.Tensor, target_logits: torch.Tensor, **kw) -> float:
    return get_divergence(name, **kw)(draft_logits, target_logits).item()


# --- identical distributions --------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_identical_distributions_give_zero(name):
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)) * 3
    out = DIVERGENCES[name](logits, logits.clone())
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.zeros(2, 3), atol=1e-6, rtol=0)
    one_hot = torch.tensor([[[0.0, NEG_INF, NEG_INF]]])
    assert DIVERGENCES[name](one_hot, one_hot.clone()).item() == 0.0


# --- hand values on two tokens ------------------------------------------------------------------

P = [0.5, 0.5]
Q = [0.9, 0.1]


def test_forward_and_reverse_kl_two_tokens():
    fkl_expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(P || Q) ~ 0.5108
    rkl_expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(Q || P) ~ 0.3681
    assert abs(fkl_expected - rkl_expected) > 0.1  # a swapped direction would be caught
    assert forward_kl(logits_of(Q), logits_of(P)).item() == pytest.approx(fkl_expected, rel=1e-6)
    assert reverse_kl(logits_of(Q), logits_of(P)).item() == pytest.approx(rkl_expected, rel=1e-6)


def test_jsd_half_is_classic_jsd():
    # M = (P + Q) / 2 = [0.7, 0.3]
    classic = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) + 0.5 * (
        0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    )
    assert jsd(logits_of(Q), logits_of(P)).item() == pytest.approx(classic, rel=1e-6)
    # Symmetric at beta = 0.5, bounded by log 2, reached by disjoint supports.
    assert jsd(logits_of(P), logits_of(Q)).item() == pytest.approx(classic, rel=1e-6)
    disjoint = jsd(logits_of([0.0, 1.0]), logits_of([1.0, 0.0])).item()
    assert disjoint == pytest.approx(math.log(2), rel=1e-6)


def test_jsd_beta_weights_the_target():
    beta = 0.2
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]  # M = beta P + (1 - beta) Q
    expected = beta * sum(p * math.log(p / m_i) for p, m_i in zip(P, m)) + (1 - beta) * sum(
        q * math.log(q / m_i) for q, m_i in zip(Q, m)
    )
    swapped = jsd_hand(Q, P, beta)  # what P/Q confusion would give
    assert abs(expected - swapped) > 1e-2
    out = jsd(logits_of(Q), logits_of(P), beta=beta).item()
    assert out == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_zero(beta):
    """Documented: at beta = 0 (M = Q) and beta = 1 (M = P) the GKD formula is identically 0."""
    generator = torch.Generator().manual_seed(1)
    draft_logits = torch.randn(2, 4, 9, generator=generator).requires_grad_()
    target_logits = torch.randn(2, 4, 9, generator=generator)
    target_logits[..., :3] = NEG_INF
    out = jsd(draft_logits, target_logits, beta=beta)
    assert torch.equal(out, torch.zeros(2, 4))
    out.sum().backward()
    assert torch.equal(draft_logits.grad, torch.zeros_like(draft_logits))


def test_jsd_small_beta_is_beta_times_forward_kl_and_large_beta_reverse_kl():
    generator = torch.Generator().manual_seed(2)
    draft_logits = torch.randn(3, 5, 16, generator=generator)
    target_logits = torch.randn(3, 5, 16, generator=generator)
    target_probs, draft_probs = softmax64(target_logits), softmax64(draft_logits)
    beta = 1e-3
    ratio_small = jsd(draft_logits, target_logits, beta=beta).double() / (
        beta * kl64(target_probs, draft_probs)
    )
    ratio_large = jsd(draft_logits, target_logits, beta=1 - beta).double() / (
        beta * kl64(draft_probs, target_probs)
    )
    torch.testing.assert_close(ratio_small, torch.ones_like(ratio_small), atol=1e-2, rtol=0)
    torch.testing.assert_close(ratio_large, torch.ones_like(ratio_large), atol=1e-2, rtol=0)


def test_tvd_is_one_minus_overlap():
    assert tvd(logits_of(Q), logits_of(P)).item() == pytest.approx(0.4, rel=1e-6)
    generator = torch.Generator().manual_seed(3)
    draft_logits = torch.randn(4, 5, 11, generator=generator) * 2
    target_logits = torch.randn(4, 5, 11, generator=generator) * 2
    overlap = torch.minimum(softmax64(target_logits), softmax64(draft_logits)).sum(dim=-1)
    out = tvd(draft_logits, target_logits)
    torch.testing.assert_close(out.double(), 1 - overlap, atol=1e-6, rtol=0)


def test_random_inputs_match_float64_formulas():
    generator = torch.Generator().manual_seed(4)
    draft_logits = torch.randn(2, 3, 13, generator=generator).to(torch.bfloat16)
    target_logits = torch.randn(2, 3, 13, generator=generator).to(torch.bfloat16)
    target_probs, draft_probs = softmax64(target_logits), softmax64(draft_logits)
    m = 0.3 * target_probs + 0.7 * draft_probs
    expected = {
        "fkl": kl64(target_probs, draft_probs),
        "rkl": kl64(draft_probs, target_probs),
        "jsd": 0.3 * kl64(target_probs, m) + 0.7 * kl64(draft_probs, m),
        "tvd": 0.5 * (target_probs - draft_probs).abs().sum(dim=-1),
        "lk": -torch.minimum(target_probs, draft_probs).sum(dim=-1).log(),
    }
    for name, want in expected.items():
        kw = {"beta": 0.3} if name == "jsd" else {}
        out = DIVERGENCES[name](draft_logits, target_logits, **kw)
        assert out.dtype == torch.float32 and out.shape == (2, 3)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


# --- temperature --------------------------------------------------------------------------------


def test_temperature_divides_both_logits():
    draft_logits = torch.tensor([[[0.0, math.log(9.0)]]])  # T=1: [0.1, 0.9]; T=2: [0.25, 0.75]
    target_logits = torch.tensor([[[0.0, math.log(4.0)]]])  # T=1: [0.2, 0.8]; T=2: [1/3, 2/3]
    p2, q2 = [1 / 3, 2 / 3], [0.25, 0.75]
    p1, q1 = [0.2, 0.8], [0.1, 0.9]
    assert value("fkl", draft_logits, target_logits, temperature=2.0) == pytest.approx(
        kl_hand(p2, q2), rel=1e-5
    )
    assert value("fkl", draft_logits, target_logits) == pytest.approx(kl_hand(p1, q1), rel=1e-5)
    assert abs(kl_hand(p2, q2) - kl_hand(p1, q2)) > 1e-2  # scaling only the draft is caught
    assert value("rkl", draft_logits, target_logits, temperature=2.0) == pytest.approx(
        kl_hand(q2, p2), rel=1e-5
    )
    assert value("jsd", draft_logits, target_logits, temperature=2.0) == pytest.approx(
        jsd_hand(p2, q2, 0.5), rel=1e-5
    )
    assert value("tvd", draft_logits, target_logits, temperature=2.0) == pytest.approx(
        tvd_hand(p2, q2), rel=1e-5
    )
    assert value("lk", draft_logits, target_logits, temperature=2.0) == pytest.approx(
        lk_hand(p2, q2), rel=1e-5
    )


# --- -inf logits: finite values and gradients ---------------------------------------------------

INF_CASES = {
    # name: (draft probs, target probs); log 0 = -inf logits
    "one_hot_target": ([0.2, 0.3, 0.5], [1.0, 0.0, 0.0]),
    "draft_misses_target_mass": ([0.0, 0.5, 0.5], [1.0, 0.0, 0.0]),
    "shared_zero": ([0.9, 0.1, 0.0], [0.5, 0.5, 0.0]),
    "disjoint_one_hots": ([0.0, 1.0, 0.0], [1.0, 0.0, 0.0]),
    "one_hot_draft": ([0.0, 0.0, 1.0], [0.25, 0.25, 0.5]),
}


@pytest.mark.parametrize("case", sorted(INF_CASES))
@pytest.mark.parametrize(
    "name, kw, hand",
    [
        ("fkl", {}, lambda q, p: kl_hand(p, q)),
        ("rkl", {}, lambda q, p: kl_hand(q, p)),
        ("jsd", {"beta": 0.1}, lambda q, p: jsd_hand(p, q, 0.1)),
        ("jsd", {"beta": 0.5}, lambda q, p: jsd_hand(p, q, 0.5)),
        ("jsd", {"beta": 0.9}, lambda q, p: jsd_hand(p, q, 0.9)),
        ("jsd", {"beta": 0.0}, lambda q, p: 0.0),
        ("jsd", {"beta": 1.0}, lambda q, p: 0.0),
        ("tvd", {}, lambda q, p: tvd_hand(p, q)),
        ("lk", {}, lambda q, p: lk_hand(p, q)),
        ("lk", {"kl_weight": 0.3}, lambda q, p: lk_hand(p, q, 0.3)),
    ],
)
def test_inf_logits_give_finite_values_and_gradients(case, name, kw, hand):
    draft_probs, target_probs = INF_CASES[case]
    draft_logits = logits_of(draft_probs).float().requires_grad_()
    target_logits = logits_of(target_probs).float()
    out = get_divergence(name, **kw)(draft_logits, target_logits)
    assert torch.isfinite(out).all()
    # kl_hand applies the documented floor where the KL is truly infinite (fkl: P>0, Q=0).
    assert out.item() == pytest.approx(hand(draft_probs, target_probs), rel=1e-5, abs=1e-6)
    out.sum().backward()
    assert torch.isfinite(draft_logits.grad).all()


def test_infinite_forward_kl_uses_the_documented_floor():
    out = forward_kl(logits_of([0.0, 0.5, 0.5]), logits_of([1.0, 0.0, 0.0])).item()
    assert out == pytest.approx(-math.log(1e-30), rel=1e-6)  # 1 * (log 1 - log 1e-30) ~ 69.08
    assert pytest.approx(math.log(1e-30)) == LOG_PROB_FLOOR


def test_gradients_with_one_hot_target_are_the_textbook_ones():
    """d FKL / d draft_logits = Q - P; d RKL / d z_i = Q_i (log(Q_i/P_i) - RKL), floored log P."""
    draft_logits = torch.tensor([[[0.3, -1.0, 2.0]]], requires_grad=True)
    target_logits = torch.tensor([[[0.0, NEG_INF, NEG_INF]]])
    q = torch.softmax(draft_logits.detach().double(), dim=-1)[0, 0]
    p = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    forward_kl(draft_logits, target_logits).sum().backward()
    torch.testing.assert_close(draft_logits.grad[0, 0].double(), q - p, atol=1e-6, rtol=0)

    draft_logits.grad = None
    log_p = torch.tensor([0.0, math.log(1e-30), math.log(1e-30)], dtype=torch.float64)
    ratio_log = q.log() - log_p
    rkl = (q * ratio_log).sum()
    reverse_kl(draft_logits, target_logits).sum().backward()
    torch.testing.assert_close(
        draft_logits.grad[0, 0].double(), q * (ratio_log - rkl), atol=1e-4, rtol=1e-5
    )


def test_masked_vocab_batch_has_finite_gradients_everywhere():
    generator = torch.Generator().manual_seed(5)
    draft_logits = torch.randn(2, 6, 10, generator=generator)
    draft_logits[..., 7:] = NEG_INF  # masked ids
    draft_logits.requires_grad_()
    target_logits = torch.full((2, 6, 10), NEG_INF)
    target_logits[..., 0] = 0.0  # one-hot everywhere
    target_logits[1, :, 8] = 1.0  # row 1: target mass on an id the draft masks
    for name in ALL_NAMES:
        draft_logits.grad = None
        out = DIVERGENCES[name](draft_logits, target_logits)
        assert torch.isfinite(out).all(), name
        out.sum().backward()
        assert torch.isfinite(draft_logits.grad).all(), name
        assert torch.equal(draft_logits.grad[..., 7:], torch.zeros(2, 6, 3)), name


# --- vocabulary width mismatch ------------------------------------------------------------------


def test_align_vocab_pads_the_narrower_side_with_neg_inf():
    draft_logits, target_logits = torch.zeros(2, 3, 4), torch.ones(2, 3, 6)
    draft_out, target_out = align_vocab(draft_logits, target_logits)
    assert draft_out.shape == target_out.shape == (2, 3, 6)
    assert torch.equal(draft_out[..., :4], draft_logits)
    assert torch.isneginf(draft_out[..., 4:]).all()
    assert target_out is target_logits
    target_out, draft_out = align_vocab(target_logits, draft_logits)  # either side may be narrow
    assert draft_out.shape == (2, 3, 6) and torch.isneginf(draft_out[..., 4:]).all()
    with pytest.raises(ValueError, match="before the vocabulary dimension"):
        align_vocab(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4))


def test_vocab_width_mismatch_gives_missing_ids_probability_zero():
    q, p = [0.5, 0.5], [0.25, 0.25, 0.5]  # the draft lacks id 2; the target puts 0.5 there
    q_padded = q + [0.0]
    draft_logits, target_logits = logits_of(q), logits_of(p)
    assert value("fkl", draft_logits, target_logits) == pytest.approx(
        0.5 * math.log(0.5) - 0.5 * math.log(1e-30) + 0.5 * math.log(0.25 / 0.5), rel=1e-6
    )
    assert value("rkl", draft_logits, target_logits) == pytest.approx(math.log(2), rel=1e-6)
    assert value("tvd", draft_logits, target_logits) == pytest.approx(0.5, rel=1e-6)
    assert value("jsd", draft_logits, target_logits) == pytest.approx(
        jsd_hand(p, q_padded, 0.5), rel=1e-6
    )
    # The target narrower than the draft: draft mass on ids the target lacks.
    assert value("tvd", logits_of(p), logits_of(q)) == pytest.approx(0.5, rel=1e-6)
    assert value("fkl", logits_of(p), logits_of(q)) == pytest.approx(math.log(2), rel=1e-6)


# --- reductions ---------------------------------------------------------------------------------


def reduction_inputs():
    per_token = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 1]])  # row 1 fully masked
    return per_token, mask


@pytest.mark.parametrize("as_bool", [False, True])
def test_reductions_by_hand(as_bool):
    per_token, mask = reduction_inputs()
    mask = mask.bool() if as_bool else mask.float()
    assert masked_sum(per_token, mask).item() == 1.0 + 8.0 + 9.0
    assert reduce_per_token(per_token, mask).item() == pytest.approx(18.0 / 3)
    # rows: [1] -> 1, [] -> ignored, [8, 9] -> 8.5; mean of 1 and 8.5 = 4.75
    assert reduce_per_sequence(per_token, mask).item() == pytest.approx(4.75)


def test_reduction_gradients_by_hand():
    per_token, mask = reduction_inputs()
    per_token.requires_grad_()
    reduce_per_sequence(per_token, mask).backward()
    expected = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.25, 0.25]])
    assert torch.equal(per_token.grad, expected)
    per_token.grad = None
    reduce_per_token(per_token, mask).backward()
    assert torch.equal(per_token.grad, mask.float() / 3)


def test_reductions_of_an_empty_mask_are_zero():
    per_token = torch.ones(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduce in (reduce_per_sequence, reduce_per_token, masked_sum):
        out = reduce(per_token, mask)
        assert out.item() == 0.0
        out.backward()
    with pytest.raises(ValueError, match="shape"):
        reduce_per_token(per_token, torch.ones(2, 4))


def test_token_normalised_accumulation_matches_the_full_batch():
    """batch 8 x accumulation 1 == batch 1 x accumulation 8 with masked_sum / global token count."""
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(8, 5, 4, generator=generator)
    target_logits = torch.randn(8, 5, 12, generator=generator)
    lengths = torch.tensor([5, 1, 3, 2, 5, 4, 1, 2])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)  # from positions
    weight = torch.randn(4, 12, generator=generator, requires_grad=True)

    reduce_per_token(forward_kl(hidden @ weight, target_logits), mask).backward()
    full_grad = weight.grad.clone()

    weight.grad = None
    num_tokens = mask.sum()
    for row in range(8):
        micro = slice(row, row + 1)
        per_token = forward_kl(hidden[micro] @ weight, target_logits[micro])
        (masked_sum(per_token, mask[micro]) / num_tokens).backward()
    torch.testing.assert_close(weight.grad, full_grad, atol=1e-6, rtol=1e-5)

    weight.grad = None  # the naive per-micro-batch mean differs when lengths vary
    for row in range(8):
        micro = slice(row, row + 1)
        per_token = forward_kl(hidden[micro] @ weight, target_logits[micro])
        (reduce_per_token(per_token, mask[micro]) / 8).backward()
    assert not torch.allclose(weight.grad, full_grad, atol=1e-4)


# --- registry and validation --------------------------------------------------------------------


def test_registry_names_and_bound_options():
    assert set(DIVERGENCES) == set(ALL_NAMES)
    assert DIVERGENCES["fkl"] is forward_kl and DIVERGENCES["rkl"] is reverse_kl
    assert get_divergence("tvd") is tvd
    bound = get_divergence("jsd", beta=0.2, temperature=2.0)
    q_at_t2 = [0.75, 0.25]  # softmax(log [0.9, 0.1] / 2) = [3, 1] / 4
    assert bound(logits_of(Q), logits_of(P)).item() == pytest.approx(
        jsd_hand(P, q_at_t2, 0.2), rel=1e-5
    )


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown divergence 'kl'") as info:
        get_divergence("kl")
    for name in ALL_NAMES:
        assert name in str(info.value)
    with pytest.raises(TypeError, match="beta"):
        get_divergence("fkl", beta=0.5)


@pytest.mark.parametrize("beta", [-0.1, 1.1, float("nan")])
def test_bad_beta_raises(beta):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        jsd(logits_of(Q), logits_of(P), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        get_divergence("jsd", beta=beta)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_bad_temperature_raises(name, temperature):
    with pytest.raises(ValueError, match="temperature must be a positive"):
        DIVERGENCES[name](logits_of(Q), logits_of(P), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        get_divergence(name, temperature=temperature)


def test_sparse_forward_kl_equals_forward_kl_with_the_full_vocabulary():
    generator = torch.Generator().manual_seed(0)
    draft = torch.randn(3, 5, 11, generator=generator)
    target = torch.randn(3, 5, 11, generator=generator)
    log_p = torch.log_softmax(target, dim=-1)
    values, ids = log_p.topk(11)
    for temperature in (1.0, 0.7):
        torch.testing.assert_close(
            sparse_forward_kl(draft, ids, values, temperature=temperature),
            forward_kl(draft, target, temperature=temperature),
        )
    # top-k: the target renormalised over k ids; absent (-inf) entries weigh nothing
    top_values, top_ids = log_p.topk(3)
    sparse = sparse_forward_kl(draft, top_ids, top_values)
    masked = torch.full_like(target, float("-inf")).scatter(-1, top_ids, top_values)
    torch.testing.assert_close(sparse, forward_kl(draft, masked))
    padded_ids = torch.cat([top_ids, torch.full_like(top_ids[..., :1], -1)], dim=-1)
    padded = torch.cat([top_values, torch.full_like(top_values[..., :1], float("-inf"))], dim=-1)
    torch.testing.assert_close(sparse_forward_kl(draft, padded_ids, padded), sparse)
    draft.requires_grad_(True)
    sparse_forward_kl(draft, padded_ids, padded).sum().backward()
    assert torch.isfinite(draft.grad).all()


# --- lk: -log of the acceptance rate -------------------------------------------------------------


def overlap_by_loops(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> list[float]:
    """sum_v min(p_v, q_v) per position, with explicit loops over float64 softmaxes."""
    rows = []
    for target_row, draft_row in zip(target_logits.reshape(-1, target_logits.shape[-1]),
                                     draft_logits.reshape(-1, draft_logits.shape[-1])):
        p = [math.exp(x) for x in target_row.double().tolist()]
        q = [math.exp(x) for x in draft_row.double().tolist()]
        rows.append(sum(min(p_v / sum(p), q_v / sum(q)) for p_v, q_v in zip(p, q)))
    return rows


def test_lk_is_minus_log_of_the_overlap():
    generator = torch.Generator().manual_seed(7)
    draft_logits = torch.randn(2, 3, 9, generator=generator) * 2
    target_logits = torch.randn(2, 3, 9, generator=generator) * 2
    expected = [-math.log(o) for o in overlap_by_loops(target_logits, draft_logits)]
    out = lk(draft_logits, target_logits)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-5)
    # = -log(1 - TVD), and lk >= TVD (since -log(1 - x) >= x)
    torch.testing.assert_close(out, -torch.log1p(-tvd(draft_logits, target_logits)), atol=1e-5,
                               rtol=1e-5)
    assert (out >= tvd(draft_logits, target_logits) - 1e-6).all()
    assert lk(logits_of(Q), logits_of(P)).item() == pytest.approx(-math.log(0.6), rel=1e-6)


def test_lk_at_a_one_hot_target_is_the_cross_entropy():
    """One-hot P on id a: sum min(P, Q) = Q(a), so lk = -log Q(a), gradient Q - P."""
    generator = torch.Generator().manual_seed(8)
    draft_logits = torch.randn(3, 4, 10, generator=generator).requires_grad_()
    labels = torch.randint(0, 10, (3, 4), generator=generator)
    target_logits = torch.full((3, 4, 10), NEG_INF).scatter(-1, labels.unsqueeze(-1), 0.0)
    out = lk(draft_logits, target_logits)
    cross_entropy = torch.nn.functional.cross_entropy(
        draft_logits.reshape(-1, 10), labels.flatten(), reduction="none").view(3, 4)
    torch.testing.assert_close(out, cross_entropy, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    expected = torch.softmax(draft_logits.detach(), -1) - torch.softmax(target_logits, -1)
    torch.testing.assert_close(draft_logits.grad, expected, atol=1e-5, rtol=1e-5)


def test_lk_kl_weight_mixes_in_forward_kl():
    generator = torch.Generator().manual_seed(9)
    draft_logits, target_logits = torch.randn(2, 3, 7, generator=generator).unbind(0)
    pure = lk(draft_logits, target_logits)
    forward = forward_kl(draft_logits, target_logits)
    for weight in (0.25, 1.0):
        mixed = get_divergence("lk", kl_weight=weight)(draft_logits, target_logits)
        torch.testing.assert_close(mixed, (1 - weight) * pure + weight * forward)


def test_lk_floor_keeps_disjoint_supports_finite():
    """Disjoint supports: every min is a floored 1e-30, so lk = -log(V * 1e-30), no NaN."""
    draft_logits = logits_of([0.0, 0.5, 0.5]).float().requires_grad_()
    out = lk(draft_logits, logits_of([1.0, 0.0, 0.0]).float())
    assert out.item() == pytest.approx(-math.log(3e-30), rel=1e-6)
    out.sum().backward()
    assert torch.isfinite(draft_logits.grad).all()


def test_lk_gradient_does_not_vanish_at_low_overlap():
    """Where the overlap is small TVD's gradient is tiny; lk's is that divided by the overlap."""
    draft_logits = torch.tensor([[[8.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    target_logits = torch.tensor([[[0.0, 8.0, 0.0, 0.0]]])
    tvd(draft_logits, target_logits).sum().backward()
    tvd_grad = draft_logits.grad.norm().item()
    draft_logits.grad = None
    lk(draft_logits, target_logits).sum().backward()
    overlap = 1 - tvd(draft_logits, target_logits).item()
    assert draft_logits.grad.norm().item() == pytest.approx(tvd_grad / overlap, rel=1e-3)
    assert draft_logits.grad.norm().item() > 100 * tvd_grad


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_bad_kl_weight_raises(weight):
    with pytest.raises(ValueError, match=r"kl_weight must be in \[0, 1\]"):
        lk(logits_of(Q), logits_of(P), kl_weight=weight)
    with pytest.raises(ValueError, match="kl_weight"):
        get_divergence("lk", kl_weight=weight)
    with pytest.raises(TypeError, match="kl_weight"):
        get_divergence("tvd", kl_weight=0.5)


# --- the cached top-k with a tail bucket ---------------------------------------------------------

OPTIONS = {"fkl": {}, "rkl": {}, "jsd": {"beta": 0.3}, "tvd": {}, "lk": {"kl_weight": 0.4}}


def topk_case(seed: int, vocab: int = 13, k: int = 13, scale: float = 2.0):
    """Random draft/target logits and the target's top-k (shuffled order) as float32 log-probs."""
    generator = torch.Generator().manual_seed(seed)
    draft_logits = torch.randn(3, 4, vocab, generator=generator) * scale
    target_logits = torch.randn(3, 4, vocab, generator=generator) * scale
    values, ids = torch.log_softmax(target_logits, dim=-1).topk(k)
    order = torch.randperm(k, generator=generator)
    return draft_logits, target_logits, ids[..., order], values[..., order]


def with_absent_entries(ids: torch.Tensor, values: torch.Tensor, count: int = 2):
    """The same cache with ``count`` absent entries (id -1, log-prob -inf) appended."""
    absent_ids = torch.full((*ids.shape[:-1], count), -1, dtype=ids.dtype)
    absent = torch.full((*values.shape[:-1], count), NEG_INF)
    return torch.cat([ids, absent_ids], dim=-1), torch.cat([values, absent], dim=-1)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_tail_bucket_is_exact_at_full_k(name):
    """k = V: the tail is empty and every divergence equals its full-vocabulary value, also
    with absent entries appended (they must not duplicate any id's mass)."""
    draft_logits, target_logits, ids, values = topk_case(10)
    divergence = get_divergence(name, **OPTIONS[name])
    full = divergence(draft_logits, target_logits)
    bucket = tail_bucket_divergence(divergence, draft_logits, ids, values)
    # fkl: the rounding residue of the float32 target tail (~1e-7) meets Q_tail = 0 (log 1e-30).
    torch.testing.assert_close(bucket, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        tail_bucket_divergence(divergence, draft_logits, *with_absent_entries(ids, values)),
        bucket, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse_divergence(divergence)(draft_logits, ids, values), full,
                               atol=1e-5, rtol=1e-5)
    grad_draft = draft_logits.clone().requires_grad_()
    tail_bucket_divergence(divergence, grad_draft, ids, values).sum().backward()
    grad_full = draft_logits.clone().requires_grad_()
    divergence(grad_full, target_logits).sum().backward()
    torch.testing.assert_close(grad_draft.grad, grad_full.grad, atol=1e-5, rtol=1e-4)


def test_tail_bucket_log_probs_by_hand():
    """Draft tail = its mass off the listed ids (id 0 included when only absent entries sit
    there), target tail = 1 - its listed mass; both sum to 1 over k + 1."""
    q = [0.1, 0.2, 0.3, 0.4]
    p = [0.5, 0.1, 0.15, 0.25]
    ids = torch.tensor([[[3, 1, -1]]])
    values = torch.tensor([[[math.log(0.25), math.log(0.1), NEG_INF]]])
    draft_log_probs, target_log_probs = tail_bucket_log_probs(logits_of(q), ids, values)
    assert draft_log_probs.dtype == target_log_probs.dtype == torch.float32
    expected_draft = [0.4, 0.2, 0.0, 0.1 + 0.3]
    expected_target = [0.25, 0.1, 0.0, 1 - 0.25 - 0.1]
    assert draft_log_probs.exp().flatten().tolist() == pytest.approx(expected_draft, rel=1e-6)
    assert target_log_probs.exp().flatten().tolist() == pytest.approx(expected_target, rel=1e-6)
    assert math.isinf(draft_log_probs[0, 0, 2].item()) and sum(p) == pytest.approx(1.0)


def test_tail_bucket_ids_beyond_the_draft_vocabulary_keep_their_target_mass():
    """A target id the (narrower) draft lacks has Q = 0, as align_vocab gives the dense path."""
    generator = torch.Generator().manual_seed(11)
    draft_logits = torch.randn(2, 3, 10, generator=generator)
    target_logits = torch.randn(2, 3, 12, generator=generator)
    values, ids = torch.log_softmax(target_logits, dim=-1).topk(12)
    for name in ("tvd", "rkl", "jsd", "lk"):
        divergence = get_divergence(name)
        torch.testing.assert_close(tail_bucket_divergence(divergence, draft_logits, ids, values),
                                   divergence(draft_logits, target_logits), atol=1e-5, rtol=1e-5)


def tail_masses(draft_logits, target_logits, ids):
    """float64 (P, Q) and their masses t_P, t_Q off the ``ids``."""
    target_probs, draft_probs = softmax64(target_logits), softmax64(draft_logits)
    listed = torch.zeros_like(target_probs, dtype=torch.bool).scatter(-1, ids.long(), True)
    return (target_probs, draft_probs, target_probs.masked_fill(listed, 0.0),
            draft_probs.masked_fill(listed, 0.0))


@pytest.mark.parametrize("seed", [12, 13, 14])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_tail_bucket_error_bounds_at_small_k(seed, k):
    """Merging the tail can only lower each divergence, by at most (with t_P, t_Q the tails):
    tvd min(t_P, t_Q) (triangle inequality); the overlap rises by as much at most; fkl loses
    exactly t_P KL(P|tail || Q|tail), rkl t_Q KL(Q|tail || P|tail) (chain rule); jsd at most
    (beta t_P + (1 - beta) t_Q) log 2 (a weighted JS divergence of the tails)."""
    draft_logits, target_logits, ids, values = topk_case(seed, vocab=16, k=k, scale=1.5)
    p, q, p_tail, q_tail = tail_masses(draft_logits, target_logits, ids)
    t_p, t_q = p_tail.sum(-1), q_tail.sum(-1)
    assert (t_p > 0.01).all() and t_p.mean() > 0.1  # a real tail: bounds not trivially met

    def gap(name):
        divergence = get_divergence(name, **OPTIONS[name])
        bucket = tail_bucket_divergence(divergence, draft_logits, ids, values).double()
        return divergence(draft_logits, target_logits).double() - bucket, bucket

    eps = 1e-5
    tvd_gap, tvd_bucket = gap("tvd")
    assert (tvd_gap >= -eps).all() and (tvd_gap <= torch.minimum(t_p, t_q) + eps).all()
    overlap_gain = tvd_gap  # overlap = 1 - tvd
    assert (overlap_gain <= t_p + eps).all()
    lk_divergence = get_divergence("lk")
    lk_gap = lk_divergence(draft_logits, target_logits).double() - tail_bucket_divergence(
        lk_divergence, draft_logits, ids, values).double()
    bucket_overlap = 1 - tvd_bucket
    lk_bound = -torch.log1p(-torch.minimum(t_p, t_q) / bucket_overlap)
    assert (lk_gap >= -eps).all() and (lk_gap <= lk_bound + eps).all()
    conditional_kl = (p_tail / t_p.unsqueeze(-1) * ((p_tail / t_p.unsqueeze(-1)).log()
                      - (q_tail / t_q.unsqueeze(-1)).log())).nan_to_num().sum(-1)
    torch.testing.assert_close(gap("fkl")[0], t_p * conditional_kl, atol=eps, rtol=1e-4)
    reverse_conditional = (q_tail / t_q.unsqueeze(-1) * ((q_tail / t_q.unsqueeze(-1)).log()
                           - (p_tail / t_p.unsqueeze(-1)).log())).nan_to_num().sum(-1)
    torch.testing.assert_close(gap("rkl")[0], t_q * reverse_conditional, atol=eps, rtol=1e-4)
    jsd_gap = gap("jsd")[0]
    beta = OPTIONS["jsd"]["beta"]
    assert (jsd_gap >= -eps).all()
    assert (jsd_gap <= (beta * t_p + (1 - beta) * t_q) * math.log(2) + eps).all()
    assert p.shape == q.shape


def test_tail_bucket_gradients_stay_finite_with_absent_rows():
    draft_logits, _, ids, values = topk_case(15, k=3)
    ids, values = with_absent_entries(ids, values)
    ids[0, 0], values[0, 0] = -1, NEG_INF  # a position with nothing cached
    for name in ALL_NAMES:
        draft = draft_logits.clone().requires_grad_()
        out = sparse_divergence(get_divergence(name, **OPTIONS[name]))(draft, ids, values)
        assert torch.isfinite(out).all(), name
        if name != "fkl":  # sparse_forward_kl: meaningless there, masked by the caller
            assert out[0, 0].abs().item() < 1e-5, name  # P = Q = the tail bucket alone
        out.sum().backward()
        assert torch.isfinite(draft.grad).all(), name


def test_sparse_divergence_keeps_renormalised_fkl_and_refuses_tail_temperature():
    draft_logits, _, ids, values = topk_case(16, k=4)
    for temperature in (1.0, 0.7):
        fkl = sparse_divergence(get_divergence("fkl", temperature=temperature))
        torch.testing.assert_close(fkl(draft_logits, ids, values),
                                   sparse_forward_kl(draft_logits, ids, values,
                                                     temperature=temperature))
    with pytest.raises(ValueError, match="temperature 1"):
        sparse_divergence(get_divergence("tvd", temperature=0.7))
    with pytest.raises(ValueError, match="temperature 1"):
        tail_bucket_divergence(get_divergence("jsd", temperature=2.0), draft_logits, ids, values)
    bound = sparse_divergence(get_divergence("jsd", beta=0.2, temperature=1.0))
    torch.testing.assert_close(
        bound(draft_logits, ids, values),
        tail_bucket_divergence(get_divergence("jsd", beta=0.2), draft_logits, ids, values))


# --- AdaSPEC token filter -----------------------------------------------------------------------


def test_kept_token_count_rounds_up_without_float_noise():
    assert kept_token_count(10, 0.7) == 7  # 0.7 * 10 = 7.000000000000001
    assert kept_token_count(10, 0.25) == 3
    assert kept_token_count(3, 0.01) == 1  # any token at all keeps at least one
    assert kept_token_count(0, 0.5) == 0
    assert kept_token_count(17, 1.0) == 17
    for bad in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"keep_fraction must be in \(0, 1\]"):
            kept_token_count(10, bad)


def filter_case(seed: int):
    generator = torch.Generator().manual_seed(seed)
    draft = torch.rand(4, 9, generator=generator)
    reference = torch.rand(4, 9, generator=generator)
    lengths = torch.tensor([9, 3, 0, 6])
    mask = torch.arange(9) < lengths.unsqueeze(1)
    return draft, reference, mask


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.77, 1.0])
def test_filter_keeps_exactly_the_intended_count_of_largest_gaps(fraction):
    draft, reference, mask = filter_case(17)
    kept = filter_tokens(draft, reference, mask.float(), fraction)
    assert kept.dtype == torch.bool and kept.shape == mask.shape
    count = math.ceil(fraction * 18 - 1e-9)
    assert int(kept.sum()) == count and not (kept & ~mask).any()
    gaps = [(d - r, i) for i, (d, r, m) in enumerate(
        zip(draft.flatten().tolist(), reference.flatten().tolist(), mask.flatten().tolist())) if m]
    chosen = {i for _, i in sorted(gaps, key=lambda g: -g[0])[:count]}
    assert set(kept.flatten().nonzero().flatten().tolist()) == chosen
    if fraction == 1.0:
        assert torch.equal(kept, mask)


def test_filter_breaks_ties_by_position_and_ignores_masked_out_values():
    draft = torch.tensor([[1.0, 1.0, 5.0, float("nan")], [1.0, 1.0, 0.0, float("inf")]])
    reference = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    kept = filter_tokens(draft, reference, mask, 0.5)  # 3 of 6: gap 5, then the first two 1s
    assert kept.tolist() == [[True, True, True, False], [False, False, False, False]]
    assert not filter_tokens(draft, reference, torch.zeros(2, 4), 0.5).any()
    with pytest.raises(ValueError, match="shape"):
        filter_tokens(draft, reference[:, :3], mask, 0.5)


@pytest.mark.parametrize("name", ["rkl", "jsd", "tvd", "lk"])
def test_the_stored_tail_keeps_a_confident_target_exact_where_one_minus_the_sum_cannot(name):
    """A confident target (tail mass ~1e-9, below float32's 1 - sum precision): with the exact
    tail column teacher_topk writes, the tail bucket never overstates the full divergence; the
    1 - sum estimate rounds the tail to 0 and inflates rkl by an order of magnitude."""
    from distillspec.training.teacher_topk import _topk_and_tail

    generator = torch.Generator().manual_seed(3)
    target_logits = torch.randn(4, 1000, generator=generator)
    target_logits[:, 7] = 24.0  # almost all the mass on one id
    draft_logits = torch.randn(4, 1000, generator=generator)
    log_probs, ids = _topk_and_tail(torch.log_softmax(target_logits, dim=-1), 32)
    assert (ids[:, -1] == TAIL_ID).all() and (log_probs[:, -1] < -15).all()
    divergence = get_divergence(name)
    full = divergence(draft_logits, target_logits)
    bucket = tail_bucket_divergence(divergence, draft_logits, ids, log_probs.half().float())
    assert (bucket <= full + 1e-3).all() and (bucket >= -1e-6).all()
    if name == "rkl":
        estimated = tail_bucket_divergence(divergence, draft_logits, ids[:, :-1],
                                           log_probs[:, :-1].half().float())
        assert (estimated > 2 * full).all()  # why the tail column exists

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
    align_vocab,
    forward_kl,
    get_divergence,
    jsd,
    masked_sum,
    reduce_per_sequence,
    reduce_per_token,
    reverse_kl,
    tvd,
)

NEG_INF = float("-inf")
ALL_NAMES = ("fkl", "rkl", "jsd", "tvd")


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
    from distillspec.training.divergences import forward_kl, sparse_forward_kl

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

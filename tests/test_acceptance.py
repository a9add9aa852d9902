"""The acceptance rule as a pure function: distribution tests on a toy vocabulary, no model."""

from __future__ import annotations

import pytest
import torch

from distillspec.decoding.acceptance import (
    acceptance_probability,
    analytic_acceptance,
    f_exp,
    f_lin,
    f_sq,
    residual_distribution,
    verify,
)
from distillspec.decoding.sampling import sample

TRIALS = 200_000
V = 6


def toy_distributions(gamma: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(gamma + 1, V, generator=generator) * 1.5, dim=-1)
    draft = torch.softmax(torch.randn(gamma, V, generator=generator) * 1.5, dim=-1)
    return target, draft


def run_trials(target, draft, trials=TRIALS, seed=1, **rule):
    """Draft ``trials`` independent blocks from ``draft`` and verify them against ``target``."""
    generator = torch.Generator().manual_seed(seed)
    draft_probs = draft.expand(trials, *draft.shape)
    draft_tokens = sample(draft_probs, generator)
    target_probs = target.expand(trials, *target.shape)
    return draft_tokens, verify(
        draft_tokens, draft_probs, target_probs, generator=generator, **rule
    )


def first_emitted(draft_tokens, outcome):
    """The first token each block emits: x_1 if accepted, else the replacement."""
    return torch.where(outcome.num_accepted > 0, draft_tokens[:, 0], outcome.next_tokens)


def second_emitted(draft_tokens, outcome):
    """The second token, for blocks that accepted x_1."""
    keep = outcome.num_accepted >= 1
    second = torch.where(outcome.num_accepted >= 2, draft_tokens[:, 1], outcome.next_tokens)
    return second[keep]


def tv(samples, distribution):
    empirical = torch.bincount(samples, minlength=distribution.shape[-1]).float() / len(samples)
    return 0.5 * (empirical - distribution).abs().sum().item()


@pytest.mark.parametrize("gamma", [1, 3])
def test_lossless_output_follows_target(gamma):
    target, draft = toy_distributions(gamma)
    draft_tokens, outcome = run_trials(target, draft)
    # Sampling noise for 2e5 draws over 6 cells is ~0.003 in TV; a wrong rule is >> 0.02.
    assert tv(first_emitted(draft_tokens, outcome), target[0]) < 0.01
    if gamma > 1:
        assert tv(second_emitted(draft_tokens, outcome), target[1]) < 0.01
    bonus = outcome.next_tokens[outcome.num_accepted == gamma]
    assert tv(bonus, target[gamma]) < 0.02


def test_acceptance_matches_sum_of_min():
    target, draft = toy_distributions(1, seed=3)
    _, outcome = run_trials(target, draft)
    empirical = outcome.accepted_mask[:, 0].float().mean().item()
    assert empirical == pytest.approx(analytic_acceptance(target[0], draft[0]).item(), abs=0.005)


def test_a_wrong_rule_fails_the_same_bound():
    """Negative control: drawing the replacement from p instead of the residual is biased."""
    target, draft = toy_distributions(1)
    generator = torch.Generator().manual_seed(1)
    draft_tokens = sample(draft.expand(TRIALS, 1, V), generator)
    accept = torch.rand(TRIALS, generator=generator) < acceptance_probability(
        target[0][draft_tokens[:, 0]], draft[0][draft_tokens[:, 0]]
    )
    wrong = torch.where(accept, draft_tokens[:, 0], sample(target[0].expand(TRIALS, V), generator))
    assert tv(wrong, target[0]) > 0.02


def test_greedy_accepts_while_argmax_agrees():
    target = torch.zeros(2, 4, 5)
    target[:, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 1.0  # target argmax 1,2,3,4
    draft_tokens = torch.tensor([[1, 2, 0], [1, 2, 3]])
    draft = torch.nn.functional.one_hot(draft_tokens, 5).float()
    outcome = verify(draft_tokens, draft, target)
    assert outcome.num_accepted.tolist() == [2, 3]
    assert outcome.next_tokens.tolist() == [3, 4]  # correction, then bonus


def test_residual_is_normalised_positive_part():
    target = torch.tensor([0.5, 0.3, 0.2])
    draft = torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual_distribution(target, draft), torch.tensor([1.0, 0.0, 0.0]))
    same = residual_distribution(target, target)
    torch.testing.assert_close(same, target)  # no residual mass: fall back to p


def test_lenience_functions():
    p = torch.tensor([0.0, 0.25, 0.5])
    torch.testing.assert_close(f_lin(p, 0.5), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(f_sq(p, 0.5), torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(f_exp(p, 0.5), torch.tensor([0.0, 0.5, 0.5**0.5]))


@pytest.mark.parametrize("lenience", ["lin", "sq", "exp"])
def test_acceptance_grows_as_epsilon_falls(lenience):
    target, draft = toy_distributions(3, seed=5)
    rates = []
    for epsilon in (1.0, 0.7, 0.4, 0.1):
        _, outcome = run_trials(target, draft, trials=50_000, lenience=lenience, epsilon=epsilon)
        rates.append(outcome.num_accepted.float().mean().item())
    assert all(later > earlier for earlier, later in zip(rates, rates[1:])), rates


@pytest.mark.parametrize("lenience", ["lin", "sq", "exp"])
def test_epsilon_one_is_exactly_lossless(lenience):
    target, draft = toy_distributions(3, seed=2)
    lossless = run_trials(target, draft, trials=5000)[1]
    lenient = run_trials(target, draft, trials=5000, lenience=lenience, epsilon=1.0)[1]
    assert torch.equal(lossless.num_accepted, lenient.num_accepted)
    assert torch.equal(lossless.next_tokens, lenient.next_tokens)


def test_greedy_fast_path_equals_the_rule_on_one_hot_distributions():
    from distillspec.decoding.acceptance import verify_greedy

    generator = torch.Generator().manual_seed(5)
    batch, gamma, vocab = 64, 4, 7
    target_tokens = torch.randint(0, vocab, (batch, gamma + 1), generator=generator)
    # drafts that agree with the target for a random prefix, then diverge (or not)
    draft_tokens = torch.where(
        torch.rand(batch, gamma, generator=generator) < 0.7,
        target_tokens[:, :gamma],
        torch.randint(0, vocab, (batch, gamma), generator=generator),
    )
    lengths = torch.randint(0, gamma + 1, (batch,), generator=generator)
    one_hot = lambda t: torch.nn.functional.one_hot(t, vocab).float()  # noqa: E731
    full = verify(draft_tokens, one_hot(draft_tokens), one_hot(target_tokens),
                  draft_lengths=lengths, generator=generator)
    fast = verify_greedy(draft_tokens, target_tokens, lengths)
    assert torch.equal(full.num_accepted, fast.num_accepted)
    assert torch.equal(full.next_tokens, fast.next_tokens)
    assert torch.equal(full.accepted_mask, fast.accepted_mask)

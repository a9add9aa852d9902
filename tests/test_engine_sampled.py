"""Sampled SD reproduces the target's distribution end to end, on a vocabulary small enough to
enumerate the exact distribution of the first two new tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed_copy, tiny_model

from distillspec import speculative_generate
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import warp

V = 8
N = 4000


@torch.no_grad()
def exact_two_token_joint(model, prompt, sampling):
    """P(t1, t2 | prompt) over V x V cells, by enumeration."""
    first = warp(model(prompt[None]).logits[0, -1], sampling)
    joint = torch.zeros(V, V)
    for token in range(V):
        extended = torch.cat([prompt, torch.tensor([token])])
        joint[token] = first[token] * warp(model(extended[None]).logits[0, -1], sampling)
    return joint.flatten()


def empirical_joint(sequences):
    cells = torch.tensor([row[0] * V + row[1] for row in sequences])
    return torch.bincount(cells, minlength=V * V).float() / len(sequences)


def tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


PROMPT = torch.tensor([5, 3, 6, 4])


def softened_target():
    """A V-token target with softened logits, so that many two-token cells carry mass."""
    target = tiny_model("llama", seed=0, vocab_size=V)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.1)
    return target


def sampled_two_tokens(target, draft, gamma: int = 3):
    """SD's empirical joint of the first two tokens over N rows at T = 1, and the run."""
    result = speculative_generate(target, draft, PROMPT.expand(N, -1), gamma=gamma,
                                  max_new_tokens=2, temperature=1.0,
                                  generator=torch.Generator().manual_seed(0))
    return empirical_joint(result.sequences), result


@pytest.mark.parametrize(
    "sampling,gamma,threshold,tree",
    [
        (SamplingConfig(temperature=1.0), 3, 0.0, ""),
        (SamplingConfig(temperature=0.8, top_k=5, top_p=0.9), 2, 0.0, ""),
        (SamplingConfig(temperature=1.0), 3, 0.35, ""),  # adaptive drafting
        # sampled trees: candidates drawn without replacement from the warped q, multi-draft rule
        (SamplingConfig(temperature=1.0), 3, 0.0, "0,1,2,0.0,0.1,1.0"),
        (SamplingConfig(temperature=0.8, top_k=5, top_p=0.9), 2, 0.0, "4:2"),
        # dynamic trees: sampled rows take the prior plan's static layout, same rule
        (SamplingConfig(temperature=1.0), 3, 0.0, "dyn:6:3:3"),
        (SamplingConfig(temperature=0.8, top_k=5, top_p=0.9), 2, 0.0, "dyn:5:2:3"),
    ],
)
def test_sampled_sd_matches_target_joint(sampling, gamma, threshold, tree):
    target = tiny_model("llama", seed=0, vocab_size=V)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.1)  # soften: many cells with mass
    draft = perturbed_copy(target, 0.6, seed=4)
    prompt = torch.tensor([5, 3, 6, 4])
    expected = exact_two_token_joint(target, prompt, sampling)
    draft_joint = exact_two_token_joint(draft, prompt, sampling)
    result = speculative_generate(
        target,
        draft,
        prompt.expand(N, -1),
        gamma=gamma,
        max_new_tokens=4,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        confidence_threshold=threshold,
        tree=tree,
        generator=torch.Generator().manual_seed(0),
    )
    observed = empirical_joint(result.sequences)
    # Sampling noise for N=4000 over <= 64 cells is ~0.04 in TV; the draft's own output is far.
    assert tv(draft_joint, expected) > 0.15, "test needs a draft that differs from the target"
    assert tv(observed, expected) < 0.07
    total = result.metrics.total
    # Empirical acceptance ~ sum(min(p, q)) (alpha), and partial acceptance actually happened.
    assert 0.2 < total.acceptance_rate < 0.95
    first_position = total.per_position_acceptance[0]
    if not tree:
        assert first_position == pytest.approx(total.analytic_alpha, abs=0.08)
    else:  # alpha is one candidate's acceptance; several candidates per node accept more often
        assert first_position > total.analytic_alpha + 0.05


@pytest.mark.parametrize("lenience", ["lin", "sq", "exp"])
def test_lenience_at_epsilon_one_is_lossless_end_to_end(lenience):
    """Through the engine, a lenient rule at epsilon = 1 emits exactly what lossless SD emits
    (same seeds: same tokens, same accepted counts); epsilon < 1 changes both (the control)."""
    target = tiny_model("llama", seed=0, vocab_size=V)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.1)
    draft = perturbed_copy(target, 0.6, seed=4)
    prompt = torch.tensor([5, 3, 6, 4]).expand(64, -1)

    def run(**rule):
        return speculative_generate(target, draft, prompt, gamma=3, max_new_tokens=6,
                                    temperature=1.0, generator=torch.Generator().manual_seed(7),
                                    **rule)

    lossless = run()
    lenient = run(lenience=lenience, epsilon=1.0)
    assert lenient.sequences == lossless.sequences
    assert lenient.metrics.accepted_tokens == lossless.metrics.accepted_tokens
    looser = run(lenience=lenience, epsilon=0.5)
    assert looser.metrics.acceptance_rate > lossless.metrics.acceptance_rate + 0.05
    assert looser.sequences != lossless.sequences


REPEATING = torch.tensor([5, 3, 6, 4, 5, 3])  # "5 3" repeats: prompt lookup proposes 6 4 5 3


@pytest.mark.parametrize("with_draft", [False, True], ids=["lookup-alone", "lookup-and-chain"])
def test_sampled_prompt_lookup_matches_target_joint(with_draft, monkeypatch):
    """Copied tokens at T = 1 are verified with their own one-hot proposal: the first two tokens
    follow the target's joint exactly. The control uses a wrong q (uniform instead of the
    one-hot the tokens came from) and is caught."""
    from distillspec.decoding import lookup_step

    target = softened_target()
    draft = perturbed_copy(target, 0.6, seed=4) if with_draft else None
    sampling = SamplingConfig(temperature=1.0)
    expected = exact_two_token_joint(target, REPEATING, sampling)

    def run():
        return speculative_generate(target, draft, REPEATING.expand(N, -1), gamma=3, lookup=4,
                                    max_new_tokens=4, temperature=1.0,
                                    generator=torch.Generator().manual_seed(0))

    result = run()
    total = result.metrics.total
    assert total.lookup_blocks >= N and 0 < total.lookup_accepted < total.lookup_proposed
    assert (result.metrics.draft_forward_passes > 0) == with_draft  # rows left lookup for chains
    assert tv(empirical_joint(result.sequences), expected) < 0.07
    monkeypatch.setattr(lookup_step, "one_hot",
                        lambda tokens, vocab: torch.full((*tokens.shape, vocab), 1.0 / vocab))
    assert tv(empirical_joint(run().sequences), expected) > 0.15

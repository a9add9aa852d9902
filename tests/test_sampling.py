"""warp: greedy is one-hot on the argmax; temperature/top-k/top-p match transformers."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import sample, sample_without_replacement, warp


def test_greedy_is_one_hot_on_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 5.0]], dtype=torch.bfloat16)
    probs = warp(logits, SamplingConfig(temperature=0.0))
    assert probs.dtype == torch.float32
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)]
)
def test_matches_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits / temperature
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    expected = torch.softmax(expected, dim=-1)
    probs = warp(logits, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))
    torch.testing.assert_close(probs, expected)
    assert TemperatureLogitsWarper  # the order above is transformers' own


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = warp(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    tiny = warp(logits, SamplingConfig(temperature=1.0, top_p=0.01))
    assert tiny.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3]).expand(20000, 3)
    tokens = sample(probs, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=3).float() / 20000
    torch.testing.assert_close(frequencies, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)


def test_sample_without_replacement_draws_in_plackett_luce_order():
    """Draw 1 follows q, draw 2 follows q without draw 1 renormalised (q(y) / (1 - q(x))), the
    draws are distinct; with 2 ids of positive mass the third draw is past the support."""
    q = torch.tensor([0.1, 0.6, 0.3, 0.0])
    trials = 40000
    uniforms = torch.rand(trials, 3, generator=torch.Generator().manual_seed(0))
    tokens = sample_without_replacement(q.expand(trials, 4), uniforms[:, :2])
    assert bool((tokens[:, 0] != tokens[:, 1]).all())
    first = torch.bincount(tokens[:, 0], minlength=4).float() / trials
    torch.testing.assert_close(first, q, atol=0.01, rtol=0)
    pairs = torch.bincount(tokens[:, 0] * 4 + tokens[:, 1], minlength=16).float() / trials
    expected = torch.tensor([[q[x] * q[y] / (1 - q[x]) if x != y else 0.0 for y in range(4)]
                             for x in range(4)]).flatten()
    torch.testing.assert_close(pairs, expected, atol=0.01, rtol=0)
    two = torch.tensor([0.0, 0.7, 0.3, 0.0]).expand(5, 4)
    drawn = sample_without_replacement(two, uniforms[:5])
    assert sorted(drawn[0, :2].tolist()) == [1, 2]



def test_tempered_probs_is_warp_with_a_temperature_per_row():
    from distillspec.decoding.sampling import tempered_probs

    logits = torch.randn(3, 2, 17, generator=torch.Generator().manual_seed(0)) * 4
    temperatures = [0.5, 1.0, 1.7]
    expected = torch.stack([warp(logits[i], SamplingConfig(temperature=t))
                            for i, t in enumerate(temperatures)])
    torch.testing.assert_close(tempered_probs(logits, torch.tensor(temperatures)), expected)
    assert tempered_probs(logits.bfloat16(), torch.tensor(temperatures)).dtype == torch.float32

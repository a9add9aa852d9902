"""The training stream (which examples each step draws), the optimiser and the training
attention switch: pure parts of the trainer, no model."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from distillspec.training.config import DistillConfig
from distillspec.training.setup import TrainState, make_optimizer, next_examples
from distillspec.training.step import attention_implementation, training_attention


def _draw(examples, steps, count=4, world=1, rank=0, lengths=None, group=0, seed=3):
    state, batches = TrainState(), []
    for _ in range(steps):
        batches.append(next_examples(examples, state, count, seed, rank, world, lengths, group))
    return batches


def test_plain_stream_is_the_seeded_per_epoch_permutation():
    examples = list(range(10))
    drawn = [e for batch in _draw(examples, 7) for e in batch]  # 28 draws: 2.8 epochs
    expected = []
    for epoch in range(3):
        expected += torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
    assert drawn == expected[:28]


def test_length_grouping_draws_the_same_examples_with_less_padding():
    rng = random.Random(0)
    examples = list(range(200))
    lengths = tuple(rng.randrange(5, 200) for _ in examples)
    plain = _draw(examples, 50, count=8)
    grouped = _draw(examples, 50, count=8, lengths=lengths, group=5)
    # Every block of 5 batches holds exactly the plain stream's examples, re-cut by length.
    for block in range(10):
        window = slice(5 * block, 5 * block + 5)
        assert sorted(e for b in grouped[window] for e in b) == sorted(
            e for b in plain[window] for e in b)
        cut = sorted(sorted(lengths[e] for e in b) for b in grouped[window])
        flat = [n for b in cut for n in b]
        assert flat == sorted(flat)  # each batch is a contiguous run of the sorted lengths
    padded = lambda batches: sum(len(b) * max(lengths[e] for e in b) for b in batches)  # noqa: E731
    assert padded(grouped) < 0.8 * padded(plain)
    # Deterministic from (seed, examples seen): drawing again, or from a restored state, agrees.
    assert _draw(examples, 50, count=8, lengths=lengths, group=5) == grouped
    state = TrainState(examples_seen=8 * 17)
    resumed = next_examples(examples, state, 8, 3, 0, 1, lengths, 5)
    assert resumed == grouped[17]
    # The batch order inside a block is shuffled, not always shortest first.
    firsts = [max(lengths[e] for e in grouped[5 * k]) for k in range(10)]
    lasts = [max(lengths[e] for e in grouped[5 * k + 4]) for k in range(10)]
    assert any(f > last for f, last in zip(firsts, lasts))


def test_length_grouping_keeps_the_processes_on_one_global_batch():
    rng = random.Random(1)
    examples = list(range(64))
    lengths = tuple(rng.randrange(1, 100) for _ in examples)
    ranks = [_draw(examples, 6, count=4, world=2, rank=r, lengths=lengths, group=4)
             for r in range(2)]
    single = _draw(examples, 6, count=8, world=1, lengths=lengths, group=4)
    for step in range(6):
        assert ranks[0][step] + ranks[1][step] == single[step]
    assert len({e for r in ranks for b in r for e in b}) > 32  # the ranks draw different rows


def test_group_of_one_is_the_plain_stream():
    lengths = tuple(range(30))
    assert _draw(list(range(30)), 9, lengths=lengths, group=1) == _draw(list(range(30)), 9)


def test_length_grouping_is_validated():
    with pytest.raises(ValueError, match="length_grouping"):
        DistillConfig(length_grouping=-1)


def test_optimizer_is_fused_for_a_whole_draft_and_updates_like_the_loop():
    torch.manual_seed(0)
    weights = [torch.randn(17, 9), torch.randn(9)]
    grads = [torch.randn_like(w) for w in weights]
    results = []
    for fused in (True, False):
        params = [w.clone().requires_grad_(True) for w in weights]
        if fused:
            optimizer = make_optimizer(params, DistillConfig(lr=1e-2, weight_decay=0.1))
            assert optimizer.defaults["fused"]
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_training_attention_is_eager_only_for_short_cpu_batches():
    config = SimpleNamespace(_attn_implementation="sdpa")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_attention("auto", config, cpu, 200) == "eager"
    assert training_attention("auto", config, cpu, 257) == "sdpa"
    assert training_attention("auto", config, cuda, 64) == "sdpa"
    assert training_attention("sdpa", config, cpu, 64) == "sdpa"
    with attention_implementation(config, "eager"):
        assert config._attn_implementation == "eager"
    assert config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="train_attention"):
        DistillConfig(train_attention="flash")

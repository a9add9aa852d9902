"""Ragged calls (decoding/ragged.py): rows joining a chain step (plain, or verifying a chain of
drafts) read their prompts in the step's own target pass, with the outputs of a prefill pass
followed by the step."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, perturbed_copy, tiny_model

import distillspec.decoding.engine as engine
from distillspec import Decoder, Request, autoregressive_generate
from distillspec.decoding.kv_cache import CachedModel
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.decoding.ragged import query_index, runs, supports


def prompts(lengths, seed=0):
    ids, mask = left_padded(lengths, seed=seed)
    return [ids[r][mask[r].bool()].tolist() for r in range(len(lengths))]


def test_runs_group_consecutive_rows_by_the_narrowest_width_or_more():
    assert runs([1, 1, 1, 5, 3, 1, 7]) == [(0, 3, 1), (3, 2, 5), (5, 1, 1), (6, 1, 7)]
    assert runs([4]) == [(0, 1, 4)]
    # Verify blocks of 3 tokens apart from the prompts (and their blocks) of joining rows.
    assert runs([3, 3, 9, 12, 3]) == [(0, 2, 3), (2, 2, 12), (4, 1, 3)]


def test_query_index_right_aligns_each_row_and_marks_pads():
    counts, offsets = [1, 1, 5, 3], [0, 1, 2, 7]
    index = query_index(counts, offsets, first=2, size=2, width=5, total=10)
    assert index.tolist() == [[2, 3, 4, 5, 6], [10, 10, 7, 8, 9]]


def prefilled_caches(model, running):
    """Two caches of ``model`` holding the ``running`` prompts (right-aligned), for A/B calls."""
    caches = (CachedModel(model), CachedModel(model))
    width = max(map(len, running))
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in running])
    for cached in caches:
        rows = cached.add_rows(len(running))
        cached.forward(tokens, [width - len(p) for p in running], rows=rows, right_align=True,
                       logits_to_keep=1)
    return caches


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_ragged_call_gives_the_logits_of_a_prefill_then_a_step(arch):
    # Two caches of one model: A prefills the joining rows' prompts, then steps every row one
    # token; B does both in one ragged call. Then both take two ordinary steps.
    model = tiny_model(arch, seed=3).float()
    running, joining = prompts([4, 9, 6], seed=1), prompts([7, 12], seed=2)
    a, b = prefilled_caches(model, running)
    for cached in (a, b):
        cached.forward(torch.tensor([[5], [6], [7]]))  # a step, so the rows sit at a pointer
    prefixes = [p[:-1] for p in joining]
    width = max(map(len, prefixes))
    rows = a.add_rows(2)
    a.forward(torch.tensor([[0] * (width - len(p)) + p for p in prefixes]),
              [width - len(p) for p in prefixes], rows=rows, right_align=True, logits_to_keep=1)
    pending = [[11], [12], [13], [joining[0][-1]], [joining[1][-1]]]
    expected = a.forward(torch.tensor(pending))
    b.add_rows(2)
    got = b.forward_ragged([[11], [12], [13], joining[0], joining[1]])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert a.positions == b.positions
    for step in ([[20], [21], [22], [23], [24]], [[30], [31], [32], [33], [34]]):
        torch.testing.assert_close(b.forward(torch.tensor(step)), a.forward(torch.tensor(step)),
                                   rtol=1e-4, atol=1e-4)


def test_a_ragged_call_keeps_each_rows_verify_block_beside_joining_prompts():
    # A verify step: every running row feeds [pending, x1, x2] and keeps those 3 positions'
    # logits; a joining row feeds its prompt then its own block, keeping the block's 3.
    model = tiny_model("llama", seed=4).float()
    running, joining = prompts([5, 8], seed=3), prompts([9], seed=4)[0]
    a, b = prefilled_caches(model, running)
    rows = a.add_rows(1)
    prefix = joining[:-3]  # the joining row's block is its prompt's last 3 tokens
    a.forward(torch.tensor([prefix]), [0], rows=rows, right_align=True, logits_to_keep=1)
    blocks = [[11, 12, 13], [14, 15, 16], joining[-3:]]
    expected = a.forward(torch.tensor(blocks), logits_to_keep=3)
    b.add_rows(1)
    got = b.forward_ragged([blocks[0], blocks[1], joining], keep=3)
    assert got.shape == expected.shape == (3, 3, expected.shape[-1])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert a.positions == b.positions
    with pytest.raises(ValueError, match="3\\+ tokens"):
        b.forward_ragged([[1, 2, 3], [4, 5]], keep=3)


def test_a_ragged_call_wider_than_the_pointer_leaves_the_other_rows_a_hole():
    model = tiny_model("llama", seed=4).float()
    cached = CachedModel(model)
    cached.add_rows(1)
    cached.forward(torch.tensor([[3, 4]]), rows=slice(0, 1), right_align=True, logits_to_keep=1)
    cached.add_rows(1)
    long = prompts([20], seed=5)[0]
    logits = cached.forward_ragged([[9], long])
    alone = CachedModel(model)
    alone.add_rows(1)
    torch.testing.assert_close(logits[1], alone.forward(torch.tensor([long]), logits_to_keep=1)[0],
                               rtol=1e-4, atol=1e-4)
    assert cached.positions == [3, 20] and cached.length == 20


def test_a_ragged_call_refuses_a_row_without_tokens():
    cached = CachedModel(tiny_model("llama").float())
    cached.add_rows(2)
    with pytest.raises(ValueError, match="1\\+ tokens for each of the 2 rows"):
        cached.forward_ragged([[3], []])


def run_joins(model, texts, joins, budget, sampling=None):
    """Target-only Decoder, row i added before step ``joins[i]``; outputs and prefill passes."""
    decoder = Decoder(model, generator=torch.Generator().manual_seed(0))
    outputs, step = {i: [] for i in range(len(texts))}, 0
    while step <= max(joins) or decoder.has_work:
        for index, join in enumerate(joins):
            if join == step:
                decoder.add(Request(texts[index], budget, sampling or SamplingConfig(),
                                    request_id=index))
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
        step += 1
    return outputs, decoder.metrics.prefill_passes


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rows_joining_a_plain_batch_decode_the_targets_greedy_tokens_without_a_prefill(arch):
    model = tiny_model(arch, seed=5).float()
    texts = prompts([5, 11, 3, 8, 14, 6], seed=6)
    joins = [0, 0, 2, 3, 3, 7]
    outputs, prefills = run_joins(model, texts, joins, budget=12)
    for index, text in enumerate(texts):
        plain = autoregressive_generate(model, torch.tensor([text]), max_new_tokens=12)
        assert outputs[index] == plain.sequences[0], f"row {index}"
    assert prefills == 0  # every join went through a ragged step


def test_sampled_rows_draw_the_same_tokens_with_or_without_ragged_joins(monkeypatch):
    # Seeded rows: the same logits and the same uniforms give the same tokens (float32).
    model = tiny_model("llama", seed=6).float()
    texts = prompts([6, 9, 4, 12], seed=8)
    sampled = SamplingConfig(temperature=1.0, top_p=0.95)
    ragged, prefills = run_joins(model, texts, [0, 1, 1, 4], budget=10, sampling=sampled)
    monkeypatch.setattr(engine, "RAGGED_JOINS", False)
    padded, before = run_joins(model, texts, [0, 1, 1, 4], budget=10, sampling=sampled)
    assert ragged == padded and prefills == 0 and before == 3


def drafting_joins(target, draft, speculation, texts, joins, budget, limit=None, sampling=None):
    """As ``run_joins`` with a draft; ``limit``: the decoder's lookahead limit every step (the
    server's arms); ``sampling``: seeded sampled rows. Outputs, metrics and the draft tokens
    accepted."""
    decoder = Decoder(target, draft, speculation)
    decoder.lookahead_limit = limit
    outputs, step = {i: [] for i in range(len(texts))}, 0
    while step <= max(joins) or decoder.has_work:
        for index, join in enumerate(joins):
            if join == step:
                decoder.add(Request(texts[index], budget, sampling or SamplingConfig(),
                                    seed=index if sampling else None, request_id=index))
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
        step += 1
    return outputs, decoder.metrics, sum(row.counts.accepted_tokens for row in decoder.finished)


@pytest.mark.parametrize(("tree", "limit", "ragged"),
                         [(None, None, True), ("3:1", 1, True), ("3:1", 0, True),
                          ("3:1", None, False)])
def test_rows_joining_a_drafting_chain_read_their_prompts_in_its_verify(tree, limit, ragged):
    # float32: greedy SD is the target's own greedy decoding, token for token, whether a row
    # joined with a prefill pass or in a chain's verify pass (a tree's verify keeps the prefill).
    target = tiny_model("llama", seed=7).float()
    draft = perturbed_copy(target, 0.1)
    texts = prompts([5, 11, 3, 8, 14, 6], seed=9)
    joins = [0, 0, 2, 3, 3, 7]
    speculation = SpeculationConfig(gamma=3, tree=tree or "")
    outputs, metrics, accepted = drafting_joins(target, draft, speculation, texts, joins, 12, limit)
    for index, text in enumerate(texts):
        plain = autoregressive_generate(target, torch.tensor([text]), max_new_tokens=12)
        assert outputs[index] == plain.sequences[0], f"row {index}"
    admissions = len(set(joins))
    assert metrics.target_prefill_passes == (0 if ragged else admissions)
    assert metrics.draft_prefill_passes == admissions  # the draft reads its prompts itself
    assert (accepted > 0) is (limit != 0)  # it drafted, except on plain steps


def test_sampled_rows_joining_a_drafting_chain_draw_the_same_tokens_either_way(monkeypatch):
    # Seeded rows, float32: the same logits, draft probabilities and uniforms give the same
    # tokens whether the joining prompts were read in a prefill pass or in the verify pass.
    target = tiny_model("llama", seed=8).float()
    draft = perturbed_copy(target, 0.2)
    texts = prompts([6, 9, 4, 12], seed=10)
    sampled = SamplingConfig(temperature=1.0, top_p=0.95)
    run = (target, draft, SpeculationConfig(gamma=3), texts, [0, 1, 1, 4], 10, None, sampled)
    ragged, ragged_metrics, _ = drafting_joins(*run)
    monkeypatch.setattr(engine, "RAGGED_JOINS", False)
    padded, padded_metrics, _ = drafting_joins(*run)
    assert ragged == padded
    assert (ragged_metrics.target_prefill_passes, padded_metrics.target_prefill_passes) == (0, 3)


def test_models_outside_the_list_keep_the_prefill():
    model = tiny_model("llama", seed=1).float()
    assert supports(model)
    model.config._attn_implementation = "eager"
    assert not supports(model)
    texts = prompts([5, 7], seed=2)
    outputs, prefills = run_joins(model, texts, [0, 2], budget=6)
    assert prefills == 2
    for index, text in enumerate(texts):
        plain = autoregressive_generate(model, torch.tensor([text]), max_new_tokens=6)
        assert outputs[index] == plain.sequences[0]

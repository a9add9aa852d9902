"""The step-level engine: rows join mid-run, leave, carry their own sampling and seeds, and each
produces exactly what it produces alone."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, perturbed_copy, tiny_model

from distillspec import Decoder, Request, autoregressive_generate, speculative_generate
from distillspec.decoding.generate import run_to_completion
from distillspec.decoding.params import SamplingConfig, SpeculationConfig

GREEDY, SAMPLED = SamplingConfig(), SamplingConfig(temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, 0.1)


def prompts(count, seed=0):
    ids, mask = left_padded([3 + (5 * i) % 9 for i in range(count)], seed=seed)
    return [ids[r][mask[r].bool()].tolist() for r in range(count)]


def alone(pair, request, gamma=3, threshold=0.0):
    target, draft = pair
    decoder = Decoder(target, draft, SpeculationConfig(gamma=gamma, confidence_threshold=threshold))
    return run_to_completion(decoder, [request]).sequences[0]


def request(prompt, budget, sampling=GREEDY, seed=None, name=None):
    return Request(list(prompt), budget, sampling, seed=seed, request_id=name)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_rows_joining_mid_run_produce_exactly_what_they_produce_alone(pair, threshold):
    target, draft = pair
    texts = prompts(6)
    plan = [  # (step at which it joins, budget, sampling, seed)
        (0, 20, GREEDY, None), (0, 9, SAMPLED, 11), (2, 15, GREEDY, None),
        (3, 12, SAMPLED, 5), (3, 1, GREEDY, None), (7, 18, SAMPLED, 2),
    ]
    decoder = Decoder(target, draft, SpeculationConfig(gamma=3, confidence_threshold=threshold),
                      generator=torch.Generator().manual_seed(0))
    outputs = {i: [] for i in range(len(plan))}
    finished = {}
    step = 0
    while step < 100 and (step <= max(p[0] for p in plan) or decoder.has_work):
        for index, (join, budget, sampling, seed) in enumerate(plan):
            if join == step:
                decoder.add(request(texts[index], budget, sampling, seed, name=index))
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
            if update.finished:
                finished[update.request_id] = update.finish_reason
        step += 1
    assert set(finished) == set(range(len(plan)))
    for index, (_, budget, sampling, seed) in enumerate(plan):
        expected = alone(pair, request(texts[index], budget, sampling, seed), threshold=threshold)
        assert outputs[index] == expected, f"row {index}"
        assert len(outputs[index]) == budget and finished[index] == "length"


def test_greedy_rows_equal_the_target_whatever_shares_the_batch(pair):
    target, _ = pair
    texts = prompts(4, seed=3)
    requests = [request(t, 16, GREEDY if i % 2 == 0 else SAMPLED, seed=i) for i, t in enumerate(texts)]
    decoder = Decoder(target, pair[1], SpeculationConfig(gamma=4))
    result = run_to_completion(decoder, requests)
    for index in (0, 2):
        plain = autoregressive_generate(target, torch.tensor([texts[index]]), max_new_tokens=16)
        assert result.sequences[index] == plain.sequences[0]


def test_cancel_and_stop_ids(pair):
    target, draft = pair
    texts = prompts(2, seed=5)
    first = alone(pair, request(texts[0], 20))
    stop = first[6]
    decoder = Decoder(target, draft, SpeculationConfig(gamma=3))
    decoder.add(Request(texts[0], 20, GREEDY, frozenset([stop]), request_id="a"))
    decoder.add(request(texts[1], 50, name="b"))
    updates = decoder.step()
    decoder.cancel("b")
    reasons = {}
    while decoder.has_work:
        for update in decoder.step():
            if update.finished:
                reasons[update.request_id] = update.finish_reason
    for update in updates:
        if update.finished:
            reasons[update.request_id] = update.finish_reason
    assert reasons == {"a": "eos", "b": "cancelled"}
    assert next(r for r in decoder.finished if r.request.request_id == "a").output == first[
        : first.index(stop) + 1
    ]


@pytest.mark.parametrize("gamma", [2, 5])
def test_adaptive_drafting_is_lossless_and_drafts_less(pair, gamma):
    target, draft = pair
    ids, mask = left_padded([4, 9, 6])
    fixed = speculative_generate(target, draft, ids, mask, gamma=gamma, max_new_tokens=24)
    adaptive = speculative_generate(target, draft, ids, mask, gamma=gamma, max_new_tokens=24,
                                    confidence_threshold=0.6)
    plain = autoregressive_generate(target, ids, mask, max_new_tokens=24)
    assert adaptive.sequences == fixed.sequences == plain.sequences
    assert adaptive.metrics.drafted_tokens < fixed.metrics.drafted_tokens
    assert adaptive.metrics.acceptance_rate >= fixed.metrics.acceptance_rate


def test_metrics_expose_the_rates_directly(pair):
    target, draft = pair
    ids, mask = left_padded([5, 7])
    metrics = speculative_generate(target, draft, ids, mask, gamma=3, max_new_tokens=10).metrics
    assert metrics.acceptance_rate == metrics.total.acceptance_rate
    assert metrics.block_efficiency == metrics.total.block_efficiency
    assert metrics.analytic_alpha == metrics.total.analytic_alpha
    with pytest.raises(AttributeError):
        metrics.no_such_metric  # noqa: B018


def test_impossible_requests_are_refused_before_anything_runs(pair):
    target, draft = pair
    decoder = Decoder(target, draft, SpeculationConfig(gamma=3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.add(request([5, 6], 0))
    with pytest.raises(ValueError, match="context"):
        decoder.add(request([5] * 200, 100))
    with pytest.raises(ValueError, match="token ids"):
        decoder.add(request([5, 10_000], 4))
    with pytest.raises(ValueError, match="gamma must be an integer >= 1 and <= 64"):
        SpeculationConfig(gamma=1_000_000_000)
    assert not decoder.has_work


class CountingProbe:
    """A probe that records which phase it measured and reports a fixed duration."""

    def __init__(self):
        self.phases = []

    def __call__(self, fn, *args):
        self.phases.append(fn.__name__)
        return 0.25, fn(*args)


def decode_all(decoder, texts, sampling=SAMPLED):
    for index, text in enumerate(texts):
        decoder.add(request(text, 10, sampling, seed=index, name=index))
    outputs = {index: [] for index in range(len(texts))}
    while decoder.has_work:
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
    return outputs


@pytest.mark.parametrize("tree", ["", "8:2"])
def test_a_step_measures_only_through_its_probe(pair, tree, monkeypatch):
    """Without a probe a step never reaches the synchronised timer (it would wait for the device
    on a GPU) and reports no times; with one, every prefill, draft and target phase goes through
    it, its seconds land in the metrics, and the tokens are the same."""
    from distillspec.decoding import timing

    target, draft = pair
    texts = prompts(3, seed=4)
    speculation = SpeculationConfig(gamma=3, tree=tree)

    def refuse(*args, **kwargs):
        raise AssertionError("a step synchronised or timed with no probe")

    # In float32 on CPU the first call of each width times its matmul kernel once
    # (packed_linear); that one-off is not a step's measurement, so it is paid first.
    decode_all(Decoder(target, draft, speculation), texts)
    with monkeypatch.context() as patch:
        for name in ("synchronize", "timed"):
            patch.setattr(timing, name, refuse)
        patch.setattr(torch.cuda, "synchronize", refuse)
        unmeasured = Decoder(target, draft, speculation)
        plain = decode_all(unmeasured, texts)
    assert unmeasured.probe is None
    assert (unmeasured.metrics.draft_time_s, unmeasured.metrics.target_time_s,
            unmeasured.metrics.prefill_time_s) == (0.0, 0.0, 0.0)

    probe = CountingProbe()
    measured = Decoder(target, draft, speculation, probe=probe)
    assert decode_all(measured, texts) == plain
    blocks = measured.metrics.target_forward_passes - measured.metrics.target_prefill_passes
    assert probe.phases.count("_prefill") == 1
    assert probe.phases.count("_draft") == probe.phases.count("_verify") == blocks > 0
    metrics = measured.metrics
    assert (metrics.prefill_time_s, metrics.draft_time_s, metrics.target_time_s) == (
        0.25, 0.25 * blocks, 0.25 * blocks)


def test_sync_timer_is_the_probe_the_generate_functions_use(pair):
    """``speculative_generate`` times its phases by default (the reported draft, target and
    prefill times) and not with ``timed=False``; the tokens are the same either way."""
    target, draft = pair
    ids, mask = left_padded([4, 7])
    timed = speculative_generate(target, draft, ids, mask, gamma=3, max_new_tokens=8)
    untimed = speculative_generate(target, draft, ids, mask, gamma=3, max_new_tokens=8,
                                   timed=False)
    assert timed.sequences == untimed.sequences
    assert timed.metrics.draft_time_s > 0 and timed.metrics.target_time_s > 0
    assert untimed.metrics.draft_time_s == untimed.metrics.target_time_s == 0.0


# -- a lookahead limit per step (the server's ModePolicy) ------------------------------------------

LIMITS = [None, 0, 0, 1, None, 0, 1, 1, 0, None, None, 0, 0, 0, None]


def decode_with_limits(decoder, requests, joins, defer=False):
    """Run the rows (``joins[i]``: the step row i joins at) with the limit of ``LIMITS`` at each
    step (``defer``: rows joining on a plain step skip the draft's prefill, as a server's do
    where plain has won); per-row outputs, and the (limit, drafted, accepted) of every row
    update."""
    outputs, blocks, step = {i: [] for i in range(len(requests))}, [], 0
    while step < 200 and (step <= max(joins) or decoder.has_work):
        for index, join in enumerate(joins):
            if join == step:
                decoder.add(requests[index])
        decoder.lookahead_limit = LIMITS[step % len(LIMITS)]
        decoder.defer_draft_prefill = defer and decoder.lookahead_limit == 0
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
            if update.new_tokens:
                blocks.append((decoder.lookahead_limit, update.drafted, update.accepted))
        step += 1
    return outputs, blocks


@pytest.mark.parametrize("tree", ["", "6:2"])
def test_plain_and_short_steps_between_speculative_ones_keep_greedy_rows_exact(pair, tree):
    # Rows joining mid-run, greedy and sampled (seeded) together; every step's limit changes.
    target, draft = pair
    texts = prompts(5, seed=7)
    joins = [0, 0, 2, 5, 6]
    requests = [request(t, 14, GREEDY if i != 1 else SAMPLED, seed=i, name=i)
                for i, t in enumerate(texts)]
    decoder = Decoder(target, draft, SpeculationConfig(gamma=3, tree=tree),
                      generator=torch.Generator().manual_seed(0))
    outputs, blocks = decode_with_limits(decoder, requests, joins)
    for index in (0, 2, 3, 4):
        plain = autoregressive_generate(target, torch.tensor([texts[index]]), max_new_tokens=14)
        assert outputs[index] == plain.sequences[0], f"row {index}"
    assert len(outputs[1]) == 14
    assert all(drafted == 0 for limit, drafted, _ in blocks if limit == 0)
    assert all(drafted <= 1 for limit, drafted, _ in blocks if limit == 1)
    assert any(drafted > 1 for limit, drafted, _ in blocks if limit is None)


def test_the_draft_reads_every_token_of_its_plain_steps(pair):
    # The draft is the target itself: with its cache in step, every drafted token is accepted.
    # A draft that missed the tokens of the plain steps before (one or several) would propose
    # from a wrong context and be rejected.
    target, _ = pair
    texts = prompts(3, seed=9)
    requests = [request(t, 30, name=i) for i, t in enumerate(texts)]
    decoder = Decoder(target, target, SpeculationConfig(gamma=3))
    _, blocks = decode_with_limits(decoder, requests, [0, 1, 4])
    drafting = [(drafted, accepted) for _, drafted, accepted in blocks if drafted > 0]
    assert len(drafting) > 10 and all(accepted == drafted for drafted, accepted in drafting)


@pytest.mark.parametrize("tree", ["", "6:2"])
def test_a_prompt_whose_draft_prefill_was_deferred_is_read_in_the_first_drafting_step(pair, tree):
    # As above, the draft is the target: rows joining on plain steps (1, 2, 5, 8) skip the
    # draft's prefill; a draft that then read their prompts wrong (or not at all) would be
    # rejected. Rows join a running batch and in one step together.
    target, _ = pair
    texts = prompts(5, seed=11)
    requests = [request(t, 24, name=i) for i, t in enumerate(texts)]
    decoder = Decoder(target, target, SpeculationConfig(gamma=3, tree=tree))
    outputs, blocks = decode_with_limits(decoder, requests, [1, 2, 2, 5, 8], defer=True)
    drafting = [(drafted, accepted) for _, drafted, accepted in blocks if drafted > 0]
    assert len(drafting) > 10 and all(accepted == drafted for drafted, accepted in drafting)
    for index, text in enumerate(texts):
        plain = autoregressive_generate(target, torch.tensor([text]), max_new_tokens=24)
        assert outputs[index] == plain.sequences[0], f"row {index}"


def test_a_row_that_ends_before_any_drafting_step_never_runs_the_draft(pair):
    target, draft = pair
    decoder = Decoder(target, draft, SpeculationConfig(gamma=3))
    decoder.lookahead_limit, decoder.defer_draft_prefill = 0, True
    text = prompts(1, seed=3)[0]
    result = run_to_completion(decoder, [request(text, 10)])
    plain = autoregressive_generate(target, torch.tensor([text]), max_new_tokens=10)
    assert result.sequences[0] == plain.sequences[0]
    assert decoder.draft.length == 0 and result.metrics.draft_forward_passes == 0


def test_a_row_joining_a_running_batch_reserves_room_past_the_pointer_only(pair):
    """A joining prompt is written to end at the pointer, so the cache needs room past it for
    the row's budget and a block only. Counting the prompt a second time doubled the capacity
    of a server admitting into a running batch (and a compiled step attends over all of it)."""
    target, draft = pair
    decoder = Decoder(target, draft, SpeculationConfig(gamma=3))
    decoder.add(request(list(range(5, 35)), 26))  # 29 + 26 + 6 slots: the first 64
    for _ in range(3):
        decoder.step()
    pointer = decoder.target.length
    capacities = [m.cache.slot_capacity for m in (decoder.target, decoder.draft)]
    decoder.add(request(list(range(40, 70)), 10, name="late"))
    decoder.step()
    assert len(decoder.rows) == 2  # the first row is still running
    need = pointer + 10 + 3 + 3  # its budget and a block's lookahead past the pointer
    assert need <= capacities[0]  # this test's premise: the room it needs was already there
    assert [m.cache.slot_capacity for m in (decoder.target, decoder.draft)] == capacities


@pytest.mark.parametrize("lookup", [0, 4])
def test_a_draft_given_to_a_decoder_that_ran_without_one_reads_each_rows_context(pair, lookup):
    # The draft is the target: with its cache filled with each row's real context, every
    # drafted token is accepted. Rows decode with no draft, get one, lose it, get it back.
    target, _ = pair
    texts = prompts(3, seed=5)
    decoder = Decoder(target, None, SpeculationConfig(gamma=3, lookup=lookup))
    for index, text in enumerate(texts):
        decoder.add(request(text, 30, name=index))
    outputs, drafting = {index: [] for index in range(3)}, []
    for step in range(60):
        if step in (2, 9):
            decoder.replace_draft(target)
        elif step == 6:
            decoder.replace_draft(None)
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
            drafting += [(update.drafted, update.accepted)] if update.drafted else []
    assert not decoder.has_work
    assert len(drafting) > 5 and all(accepted == drafted for drafted, accepted in drafting)
    for index, text in enumerate(texts):
        plain = autoregressive_generate(target, torch.tensor([text]), max_new_tokens=30)
        assert outputs[index] == plain.sequences[0], f"row {index}"

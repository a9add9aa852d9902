"""Prompt lookup: the n-gram index against a brute-force scan, and lookup blocks keep greedy
output exactly the target's (float32), with or without a draft, chain or tree, rows joining
mid-run; sampled rows take lookup blocks too (their distribution: tests/test_engine_sampled.py)
without changing the greedy rows' output."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import left_padded, perturbed_copy, tiny_model

from distillspec import Decoder, Request, autoregressive_generate, speculative_generate
from distillspec.decoding.generate import run_to_completion
from distillspec.decoding.ngram import LONGEST_NGRAM, NgramIndex
from distillspec.decoding.params import SamplingConfig, SpeculationConfig

GREEDY, SAMPLED = SamplingConfig(), SamplingConfig(temperature=1.0)
MAX_NEW = 40


def scan_proposal(tokens, count, shortest):
    """Brute force: for n from max(shortest, 4) down, the latest earlier start i < len - n with
    tokens[i:i+n] == the last n tokens; propose what followed it."""
    length = len(tokens)
    for n in range(max(shortest, LONGEST_NGRAM), shortest - 1, -1):
        if length < n:
            continue
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[length - n :]:
                return tokens[start + n : start + n + count]
    return []


@pytest.mark.parametrize("shortest", [1, 2, 3, 5])
def test_index_equals_a_brute_force_scan_as_the_context_grows(shortest):
    rng = random.Random(shortest)
    for _ in range(20):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
        index = NgramIndex(shortest)
        while len(tokens) < 60:
            count = rng.randrange(0, 7)
            assert index.propose(tokens, count) == scan_proposal(tokens, count, shortest)
            tokens = tokens + [rng.randrange(4) for _ in range(rng.randrange(1, 4))]


def test_index_prefers_the_longest_suffix_then_the_latest_occurrence():
    index = NgramIndex(1)
    # "5" appeared last before 9; "3 5" appeared before 7: the 2-gram wins over the later 1-gram
    assert index.propose([3, 5, 7, 1, 5, 9, 3, 5], 2) == [7, 1]
    latest = NgramIndex(2)
    assert latest.propose([1, 2, 8, 1, 2, 9, 1, 2], 1) == [9]  # the latest of two occurrences
    assert NgramIndex(2).propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert NgramIndex(2).propose([4, 4], 3) == []  # a suffix is never its own match
    assert NgramIndex(1).propose([4, 4], 3) == [4]


def test_index_refuses_bad_use():
    with pytest.raises(ValueError, match="shortest n-gram"):
        NgramIndex(0)
    index = NgramIndex(2)
    index.propose([1, 2, 3, 1, 2], 2)
    with pytest.raises(ValueError, match="only grows"):
        index.propose([1, 2], 2)


@pytest.mark.parametrize("values, word", [
    ({"lookup": -1}, "lookup must"), ({"lookup": 65}, "lookup must"), ({"lookup": True}, "lookup must"),
    ({"lookup_ngram": 0}, "lookup_ngram"), ({"lookup_ngram": 17}, "lookup_ngram"),
])
def test_config_refuses_impossible_lookup_values(values, word):
    with pytest.raises(ValueError, match=word):
        SpeculationConfig(**values)


def repeating_prompts(lengths, seed=0):
    """Left-padded prompts whose second half repeats their first (so lookup has matches)."""
    ids, mask = left_padded([n // 2 for n in lengths], seed=seed)
    rows = [ids[r][mask[r].bool()].tolist() for r in range(len(lengths))]
    rows = [row + row for row in rows]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, 0.1)


@pytest.mark.parametrize("lengths", [[12], [10, 16, 4, 8]], ids=["batch1", "batch4-ragged"])
@pytest.mark.parametrize("setup", [
    dict(draft=False, gamma=1, lookup=1), dict(draft=False, gamma=1, lookup=6, lookup_ngram=1),
    dict(draft=True, gamma=3, lookup=5), dict(draft=True, gamma=2, lookup=3, tree="4:1"),
    dict(draft=True, gamma=2, lookup=8, tree="8:2"),
], ids=["no-draft-1", "no-draft-6-n1", "chain", "tree-4:1", "tree-8:2"])
def test_lookup_blocks_keep_greedy_output_exactly_the_targets(pair, lengths, setup):
    target, draft = pair
    setup = dict(setup)
    use_draft = setup.pop("draft")
    input_ids, attention_mask = repeating_prompts(lengths)
    reference = autoregressive_generate(target, input_ids, attention_mask, max_new_tokens=MAX_NEW)
    result = speculative_generate(target, draft if use_draft else None, input_ids, attention_mask,
                                  max_new_tokens=MAX_NEW, **setup)
    assert result.sequences == reference.sequences
    total = result.metrics.total
    assert total.lookup_blocks > 0 and total.lookup_accepted > 0  # lookup really ran and paid
    assert total.lookup_accepted <= total.lookup_proposed
    if not use_draft:
        assert result.metrics.draft_forward_passes == 0 and total.drafted_tokens == 0
        assert total.block_efficiency > 1.0  # fewer target calls than tokens, with no draft


def test_a_sampled_row_in_lookup_blocks_leaves_greedy_rows_exact(pair):
    """A mixed batch takes lookup blocks (greedy rows compare argmaxes, the sampled row keeps a
    copied token with probability p(token)); the greedy rows' output is the target's. A seeded
    sampled row turns lookup off while it is live, so its answer is the same alone and batched."""
    target, draft = pair
    input_ids, attention_mask = repeating_prompts([10, 14, 8])
    prompts = [input_ids[r][attention_mask[r].bool()].tolist() for r in range(3)]
    speculation = SpeculationConfig(gamma=3, lookup=5)
    mixed = [Request(prompts[0], 24, GREEDY), Request(prompts[1], 24, SAMPLED),
             Request(prompts[2], 24, GREEDY)]
    result = run_to_completion(Decoder(target, draft, speculation), mixed)
    assert result.metrics.total.lookup_blocks > 0
    for index in (0, 2):
        plain = autoregressive_generate(target, torch.tensor([prompts[index]]), max_new_tokens=24)
        assert result.sequences[index] == plain.sequences[0]
    seeded = Request(prompts[1], 24, SAMPLED, seed=3)
    batched = run_to_completion(Decoder(target, draft, speculation), [mixed[0], seeded])
    assert batched.metrics.total.lookup_blocks == 0
    alone = run_to_completion(Decoder(target, draft, speculation), [seeded])
    assert alone.sequences[0] == batched.sequences[1]
    greedy_alone = run_to_completion(Decoder(target, draft, speculation), [mixed[0]])
    assert greedy_alone.metrics.total.lookup_blocks > 0  # the control: it copies without it


def check_caches(decoder):
    """Each cache has read exactly its row's context but what the row still owes it: the
    target its prefix (a ragged join) and pending token, the draft its ``draft_pending``."""
    for index, row in enumerate(decoder.rows):
        context = len(row.context)
        assert decoder.target.positions[index] + len(row.target_prefix) + 1 == context
        if decoder.draft is not None:
            assert decoder.draft.positions[index] + len(row.draft_pending) == context


@pytest.mark.parametrize("setup", [
    dict(gamma=3, lookup=6, tree="4:1"), dict(gamma=3, lookup=6), dict(gamma=1, lookup=6),
], ids=["tree", "chain-ragged-joins", "no-draft"])
def test_rows_joining_mid_run_with_lookup_produce_the_targets_greedy_output(pair, setup):
    target, draft = pair
    input_ids, attention_mask = repeating_prompts([8, 12, 6, 10], seed=2)
    prompts = [input_ids[r][attention_mask[r].bool()].tolist() for r in range(4)]
    plan = [(0, 30), (2, 17), (3, 1), (5, 25)]  # (step it joins at, budget)
    with_draft = "tree" in setup or setup["gamma"] > 1
    decoder = Decoder(target, draft if with_draft else None, SpeculationConfig(**setup))
    outputs = {i: [] for i in range(len(plan))}
    step = ragged = 0
    while step < 200 and (step <= max(join for join, _ in plan) or decoder.has_work):
        for index, (join, budget) in enumerate(plan):
            if join == step:
                decoder.add(Request(prompts[index], budget, GREEDY, request_id=index))
        ragged += decoder._joins_ragged()
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
        check_caches(decoder)
        step += 1
    assert bool(ragged) == ("tree" not in setup)  # chains read joining prompts in their pass
    for index, (_, budget) in enumerate(plan):
        plain = autoregressive_generate(target, torch.tensor([prompts[index]]),
                                        max_new_tokens=budget)
        assert outputs[index] == plain.sequences[0], f"row {index}"
    assert any(row.counts.lookup_blocks for row in decoder.finished)


def test_eval_setups_take_a_lookup_option():
    from distillspec.tools.eval_config import EvalConfig, EvalSetup

    tree = EvalSetup.parse("tree:15:2:lookup=8")
    assert tree.speculation.lookup == 8 and tree.speculation.tree == "15:2" and tree.uses_draft
    chain = EvalSetup.parse("sd:3:threshold=0.4:lookup=5")
    assert (chain.speculation.gamma, chain.speculation.confidence_threshold,
            chain.speculation.lookup) == (3, 0.4, 5)
    alone = EvalSetup.parse("target:lookup=6")
    assert alone.speculation.lookup == 6 and not alone.uses_draft
    for text, word in (("sd:3:lookup=x", "whole number"), ("target:lookup=65", "lookup must"),
                       ("sd:3:lookup=2:lookup=3", "once"), (":lookup=4", "whole number")):
        with pytest.raises(ValueError, match=word):
            EvalSetup.parse(text)
    sampled = EvalConfig(task="text", setups=["target", "target:lookup=4"],
                         sampling=SamplingConfig(temperature=1.0))  # sampled rows copy too
    assert sampled.setups == ["target", "target:lookup=4"]


def test_lookup_is_refused_or_dropped_where_it_cannot_act_or_was_not_measured(pair, tmp_path):
    from distillspec.models.recommended import save_recommended, saved_setting, setting_at
    from distillspec.tools.eval_config import EvalSetup

    target, _ = pair
    input_ids, attention_mask = repeating_prompts([8])
    sampled = speculative_generate(target, None, input_ids, attention_mask, gamma=1, lookup=4,
                                   max_new_tokens=6, temperature=1.0)
    assert sampled.metrics.total.lookup_blocks > 0
    with pytest.raises(ValueError, match="lookup_ngram 3 shapes prompt lookup, which is off"):
        SpeculationConfig(lookup_ngram=3)
    with pytest.raises(ValueError, match=">= 1"):
        EvalSetup.parse("target:lookup=0")
    assert EvalSetup.parse("target:lookup=3").speculation.lookup == 3
    save_recommended(tmp_path, target="t", gamma=2, confidence_threshold=0.0, tree="4:1",
                     lookup=8, device=torch.device("cpu"), dtype=torch.float32,
                     measured={"speedup": 1.3})
    saved = saved_setting(tmp_path)
    assert setting_at(saved, 0.0)["lookup"] == 8
    assert setting_at(saved, 0.7)["lookup"] == 0  # timed greedily only: not carried to T > 0


def test_a_served_greedy_request_runs_lookup_blocks_and_stays_exact(tmp_path):
    openai = pytest.importorskip("openai")
    from conftest import start_tiny_server

    from distillspec.models.loading import load_model

    local, url = start_tiny_server(tmp_path, speculation={"gamma": 3, "lookup": 6})
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        model, tokenizer = load_model(tmp_path / "target", device="cpu", dtype="float32")
        prompt = " ".join(f"w{i}" for i in (3, 9, 27, 5, 3, 9, 27, 5, 3, 9))
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        expected = autoregressive_generate(model, ids, max_new_tokens=24,
                                           eos_token_id=model.generation_config.eos_token_id)
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                          temperature=0)
        text = tokenizer.decode(expected.sequences[0], skip_special_tokens=True)
        assert reply.choices[0].text == text
        metrics = urllib_get(url.removesuffix("/v1") + "/metrics")
        assert 'distillspec_spec_decode_steps_total{mode="lookup"}' in metrics
        assert 'lookup="6"' in metrics
    finally:
        local.__exit__(None, None, None)


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()

"""Compiled decoding steps (static shapes, ``torch.compile``) give what the eager path gives.

Kept cheap: 2-layer models, few shapes (every new rows x width x capacity is one more graph).
"""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, perturbed_copy, tiny_model
from test_kv_cache import pads_of, uncached_last_logits

from distillspec import autoregressive_generate, speculative_generate
from distillspec.decoding import sampled_tree
from distillspec.decoding.kv_cache import CachedModel, compile_steps, steps_compiled


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled_pair():
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.3)
    compile_steps(target)
    compile_steps(draft)
    yield target, draft
    compile_steps(target, False)
    compile_steps(draft, False)


def test_compiled_cache_rollback_join_leave_equal_an_uncached_forward(compiled_pair):
    model, _ = compiled_pair
    graphs = compiled_graphs()
    input_ids, attention_mask = left_padded([3, 6])
    prompts = [input_ids[0, 3:].tolist(), input_ids[1].tolist()]
    cached = CachedModel(model, rows=2)
    assert cached.compiled
    cached.forward(input_ids, pads_of(attention_mask))
    cached.forward(torch.tensor([[20, 21, 22], [30, 31, 32]]))  # compiled (all rows)
    cached.rollback([2, 0])  # row 0 keeps 20 (two holes), row 1 keeps all
    cached.forward(torch.tensor([[40, 41], [0, 50]]), [0, 1])
    cached.rollback([1, 1])
    joined = cached.add_rows(1)  # a row joins: prefill is eager, right-aligned to the pointer
    cached.forward(torch.tensor([[7, 8, 9]]), rows=joined, right_align=True)
    logits = cached.forward(torch.tensor([[60], [70], [10]]))[:, -1]
    expected = uncached_last_logits(
        model, [prompts[0] + [20, 40, 60], prompts[1] + [30, 31, 32, 70], [7, 8, 9, 10]]
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert compiled_graphs() > graphs  # the steps did run compiled
    assert cached.remove_rows([0]) == [2, 1]  # leaves: the last row moves into its place
    logits = cached.forward(torch.tensor([[11], [71]]))[:, -1]
    expected = uncached_last_logits(
        model, [[7, 8, 9, 10, 11], prompts[1] + [30, 31, 32, 70, 71]]
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_rows_joining_compiled_plain_steps_read_their_prompts_in_ragged_calls(compiled_pair):
    """A compiled target decoding plain, rows joining mid-run: each join is an eager ragged
    call (no prefill pass), the steps between run compiled, every row is transformers'
    greedy output."""
    from test_engine_greedy import hf_greedy

    from distillspec import Decoder, Request

    model, _ = compiled_pair
    texts = [left_padded([n], seed=n)[0][0].tolist() for n in (4, 9, 6)]
    joins, outputs, step = [0, 2, 5], {0: [], 1: [], 2: []}, 0
    decoder = Decoder(model)
    graphs = compiled_graphs()
    while step <= max(joins) or decoder.has_work:
        for index, join in enumerate(joins):
            if join == step:
                decoder.add(Request(texts[index], 8, request_id=index))
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
        step += 1
    assert decoder.metrics.prefill_passes == 0 and compiled_graphs() > graphs
    for index, text in enumerate(texts):
        reference = hf_greedy(model, torch.tensor([text]), None, 8).tolist()[0]
        assert outputs[index] == reference, f"row {index}"


def test_compiled_steps_stay_exact_when_the_capacity_grows(compiled_pair):
    """Past the first 256 slots the buffers grow (a new graph); every row stays exact."""
    model, _ = compiled_pair
    history = list(range(4, 90)) * 3  # 258 tokens: the prefill alone fills the first bucket
    cached = CachedModel(model, rows=1)
    cached.forward(torch.tensor([history[:250]]))  # eager prefill
    for token in history[250:]:
        logits = cached.forward(torch.tensor([[token]]))[:, -1]  # compiled, crosses 256 slots
    assert cached.cache.slot_capacity > 256
    torch.testing.assert_close(logits, uncached_last_logits(model, [history]), atol=1e-5,
                               rtol=1e-5)


def test_compiled_steps_attend_over_the_written_slots_not_the_whole_capacity(compiled_pair):
    """A long budget reserves many slots long before they are written: a step's keys stop at
    the pointer rounded up to 256 slots (its logits exact), and grow with it."""
    model, _ = compiled_pair
    history = list(range(4, 90)) * 4
    cached = CachedModel(model, rows=2)
    cached.reserve(2, 1024)  # e.g. a row admitted with a budget of ~1000 tokens
    cached.forward(torch.tensor([history[:40], history[1:41]]))  # eager prefill
    logits = cached.forward(torch.tensor([[history[40]], [history[41]]]))[:, -1]  # compiled
    assert (cached.cache.slot_capacity, cached.cache.write_window) == (1024, 256)
    torch.testing.assert_close(
        logits, uncached_last_logits(model, [history[:41], history[1:42]]), atol=1e-5, rtol=1e-5)
    cached.forward(torch.tensor([history[41:258], history[42:259]]))  # to 257 slots, eager
    logits = cached.forward(torch.tensor([[history[258]], [history[259]]]))[:, -1]
    assert (cached.cache.slot_capacity, cached.cache.write_window) == (1024, 512)
    torch.testing.assert_close(
        logits, uncached_last_logits(model, [history[:259], history[1:260]]), atol=1e-5,
        rtol=1e-5)


def eager_greedy(target, input_ids, attention_mask, max_new_tokens: int) -> list[list[int]]:
    """The target's own greedy decoding with its compiled steps turned off for the call."""
    compile_steps(target, False)
    try:
        return autoregressive_generate(target, input_ids, attention_mask,
                                       max_new_tokens=max_new_tokens).sequences
    finally:
        compile_steps(target)


def test_compiled_greedy_sd_equals_eager_target(compiled_pair):
    target, draft = compiled_pair
    input_ids, attention_mask = left_padded([4, 9])
    compiled = speculative_generate(target, draft, input_ids, attention_mask, gamma=3,
                                    max_new_tokens=20)
    assert compiled.sequences == eager_greedy(target, input_ids, attention_mask, 20)
    assert compiled.metrics.acceptance_rate > 0  # the draft's compiled steps took part


@pytest.mark.parametrize("tree", ["6:2", "dyn:5:3:2"])
def test_compiled_greedy_tree_sd_equals_eager_target(compiled_pair, tree):
    """Tree steps run compiled too, static and dynamic (a mask and positions per row): their
    masks and positions are tensors like a chain's."""
    target, draft = compiled_pair
    input_ids, attention_mask = left_padded([4, 9])
    graphs = compiled_graphs()
    compiled = speculative_generate(target, draft, input_ids, attention_mask, gamma=1,
                                    tree=tree, max_new_tokens=20)
    assert compiled_graphs() > graphs
    assert compiled.sequences == eager_greedy(target, input_ids, attention_mask, 20)


@pytest.mark.parametrize("tree", [None, "3:2", "dyn:5:3:2"])
def test_compiled_sampled_sd_draws_what_eager_draws(compiled_pair, tree, monkeypatch):
    """Same seed, same uniforms: the compiled path must sample the very same tokens, chain and
    trees (whose sampled rule then runs compiled too, ``sampled_tree``: the dynamic tree at
    T = 1 with the warp inside the graph, tree 3:2 lenient at T = 0.7 with top-k and top-p,
    warped eagerly)."""
    target, draft = compiled_pair
    rules = []
    compiled_rule = sampled_tree._compiled
    monkeypatch.setattr(sampled_tree, "_compiled",
                        lambda function: rules.append(1) or compiled_rule(function))
    input_ids, attention_mask = left_padded([5] if tree is None else [5, 8])
    common = dict(gamma=3, max_new_tokens=24, temperature=1.0, tree=tree)
    if tree == "3:2":  # the rule after an eager top-k / top-p warp, lenient
        common.update(temperature=0.7, top_k=20, top_p=0.9, lenience="lin", epsilon=0.5)
    compiled = speculative_generate(target, draft, input_ids, attention_mask,
                                    generator=torch.Generator().manual_seed(7), **common)
    compiled_blocks = len(rules)
    for model in compiled_pair:
        compile_steps(model, False)
    try:
        assert not steps_compiled(target)
        eager = speculative_generate(target, draft, input_ids, attention_mask,
                                     generator=torch.Generator().manual_seed(7), **common)
    finally:
        for model in compiled_pair:
            compile_steps(model)
    assert compiled.sequences == eager.sequences
    assert (compiled_blocks > 0) == (tree is not None) and len(rules) == compiled_blocks


def test_auto_compiles_only_where_the_bench_measured_a_gain(tmp_path, monkeypatch):
    from distillspec.models.compilation import apply_compile, record_verdict

    monkeypatch.setenv("DISTILLSPEC_COMPILE_VERDICTS", str(tmp_path / "verdicts.json"))
    target, draft = tiny_model("llama", seed=1), tiny_model("llama", seed=2, layers=1)
    unmeasured = apply_compile("auto", target=target, draft=draft)
    assert [d.compiled for d in unmeasured] == [False, False]
    assert "not measured" in unmeasured[0].reason and not steps_compiled(target)
    record_verdict(target, {"gain": 1.3})
    record_verdict(draft, {"gain": 1.01})  # within the noise: stays eager
    measured = apply_compile("auto", target=target, draft=draft)
    assert [d.compiled for d in measured] == [True, False]
    assert steps_compiled(target) and not steps_compiled(draft)
    assert "1.30x" in measured[0].describe() and "below" in measured[1].reason
    batched = apply_compile("auto", 4, target=target)  # verdicts are for batch 1
    assert not batched[0].compiled and not steps_compiled(target)
    record_verdict(target, {"gain": 1.3, "compile_s": 30.0, "eager_ms": {"1": 13.0},
                            "compiled_ms": {"1": 10.0}})
    short = apply_compile("auto", 1, 1000, target=target)  # saves ~3 s, compiling costs 30 s
    assert not short[0].compiled and "30 s of compiling" in short[0].reason
    long = apply_compile("auto", 1, 20_000, target=target)  # saves ~60 s
    assert long[0].compiled
    compile_steps(target, False)
    apply_compile("off", target=target, draft=None)
    assert not steps_compiled(target)
    assert [d.compiled for d in apply_compile("on", draft=draft)] == [True]
    compile_steps(draft, False)
    with pytest.raises(ValueError, match="compile must be one of"):
        apply_compile("sometimes", target=target)


def test_a_verdict_pools_the_last_benches_gains(tmp_path, monkeypatch):
    """``gain`` is the median of the last GAIN_HISTORY gains measured under one key, so one
    noisy bench does not flip ``auto``; a verdict written before pooling counts as one."""
    import json

    from distillspec.models.compilation import GAIN_HISTORY, decide, record_verdict, verdict_key

    path = tmp_path / "verdicts.json"
    monkeypatch.setenv("DISTILLSPEC_COMPILE_VERDICTS", str(path))
    draft = tiny_model("llama", seed=2, layers=1)
    path.write_text(json.dumps({verdict_key(draft): {"gain": 1.18}}))  # an older verdict
    record_verdict(draft, {"gain": 1.02})  # alone it would say eager
    verdict = record_verdict(draft, {"gain": 1.07, "compile_s": 2.0})
    assert verdict["gains"] == [1.18, 1.02, 1.07] and verdict["last_gain"] == 1.07
    assert verdict["gain"] == 1.07 and verdict["compile_s"] == 2.0
    decision = decide("auto", draft, "draft")
    assert decision.compiled and "3 benches here measured 1.07x (median)" in decision.reason
    for gain in (1.0, 1.01, 1.03, 1.04):
        verdict = record_verdict(draft, {"gain": gain})
    assert verdict["gains"] == [1.02, 1.07, 1.0, 1.01, 1.03, 1.04][-GAIN_HISTORY:]
    assert verdict["gain"] == 1.03 and not decide("auto", draft, "draft").compiled


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_greedy_sd_equals_eager_target_on_cuda():
    target = tiny_model("llama", seed=0).cuda()
    draft = perturbed_copy(target, 0.3)
    input_ids, attention_mask = (t.cuda() for t in left_padded([4, 9]))
    plain = autoregressive_generate(target, input_ids, attention_mask, max_new_tokens=20)
    compile_steps(target)
    compile_steps(draft)
    try:
        compiled = speculative_generate(target, draft, input_ids, attention_mask, gamma=3,
                                        max_new_tokens=20)
    finally:
        compile_steps(target, False)
        compile_steps(draft, False)
    assert compiled.sequences == plain.sequences

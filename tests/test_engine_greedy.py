"""Greedy SD equals the target's own greedy decoding, token for token (float32)."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, perturbed_copy, tiny_model

from distillspec import autoregressive_generate, speculative_generate

MAX_NEW = 24


def hf_greedy(model, input_ids, attention_mask, max_new_tokens, eos=None):
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=eos,
    )
    return out[:, input_ids.shape[1] :]


def strip_after_eos(rows, eos):
    stripped = []
    for row in rows:
        row = list(row)
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        stripped.append(row)
    return stripped


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request):
    target = tiny_model(request.param, seed=0)
    return {
        "target": target,
        "same": target,
        "random": tiny_model(request.param, seed=7),
        "partial": perturbed_copy(target, 0.1),
    }


@pytest.mark.parametrize("lengths", [[7], [5, 11, 2, 8]], ids=["batch1", "batch4-ragged"])
@pytest.mark.parametrize("draft_kind", ["same", "random", "partial"])
def test_greedy_equals_target_for_all_gammas(models, draft_kind, lengths):
    target, draft = models["target"], models[draft_kind]
    input_ids, attention_mask = left_padded(lengths)
    reference = hf_greedy(target, input_ids, attention_mask, MAX_NEW).tolist()
    plain = autoregressive_generate(target, input_ids, attention_mask, max_new_tokens=MAX_NEW)
    assert plain.sequences == reference
    for gamma in range(1, 9):
        result = speculative_generate(
            target, draft, input_ids, attention_mask, gamma=gamma, max_new_tokens=MAX_NEW
        )
        assert result.sequences == reference, f"gamma={gamma}"
        total = result.metrics.total
        if draft_kind == "same":
            assert total.acceptance_rate == 1.0
        elif draft_kind == "random":
            assert total.acceptance_rate < 0.1
    if draft_kind == "partial":  # the regime where rows accept different amounts
        assert 0.2 < total.acceptance_rate < 0.9
        assert len(set(total.accepted_lengths)) > 2


def test_each_row_stops_at_its_own_eos(models):
    target, draft = models["target"], models["partial"]
    input_ids, attention_mask = left_padded([6, 3, 9], seed=3)
    plain = autoregressive_generate(target, input_ids, attention_mask, max_new_tokens=MAX_NEW)
    # Choose as EOS a token the target emits mid-way in row 0, so that row stops early.
    eos = plain.sequences[0][5]
    reference = strip_after_eos(
        hf_greedy(target, input_ids, attention_mask, MAX_NEW, eos).tolist(), eos
    )
    for gamma in (1, 3, 6):
        result = speculative_generate(
            target,
            draft,
            input_ids,
            attention_mask,
            gamma=gamma,
            max_new_tokens=MAX_NEW,
            eos_token_id=[eos, 10_000],
        )
        assert result.sequences == reference
        assert result.sequences[0][-1] == eos and result.metrics.finish_reasons[0] == "eos"
        for row, reason in zip(result.sequences, result.metrics.finish_reasons):
            assert reason == ("eos" if row[-1] == eos else "length")
            assert len(row) <= MAX_NEW


def test_prompt_of_one_token_and_budget_of_one(models):
    target, draft = models["target"], models["partial"]
    input_ids, attention_mask = left_padded([1, 4])
    for max_new in (1, 2, 5):
        reference = hf_greedy(target, input_ids, attention_mask, max_new).tolist()
        result = speculative_generate(
            target, draft, input_ids, attention_mask, gamma=4, max_new_tokens=max_new
        )
        assert result.sequences == reference


def test_metrics_are_consistent(models):
    target, draft = models["target"], models["partial"]
    input_ids, attention_mask = left_padded([5, 8, 3])
    result = speculative_generate(
        target, draft, input_ids, attention_mask, gamma=4, max_new_tokens=MAX_NEW
    )
    metrics = result.metrics
    for row, counts in zip(result.sequences, metrics.rows):
        assert counts.new_tokens == len(row) == MAX_NEW
        assert sum(counts.accepted_length_histogram) == counts.target_calls
        assert counts.accepted_tokens == sum(counts.accepted_lengths)
        # Every call emits accepted + 1 tokens, the last call's surplus is cut at the budget.
        assert counts.new_tokens <= counts.accepted_tokens + counts.target_calls
        assert counts.block_efficiency == pytest.approx(counts.new_tokens / counts.target_calls)
        # Greedy: analytic alpha is the agreement rate on verified positions.
        assert 0.0 <= counts.analytic_alpha <= 1.0
    summary = metrics.to_dict()
    assert summary["new_tokens"] == 3 * MAX_NEW
    assert summary["wall_time_s"] >= summary["draft_time_s"] + summary["target_time_s"] * 0.5
    assert summary["tokens_per_second"] > 0
    assert metrics.target_forward_passes >= max(c.target_calls for c in metrics.rows)


def test_padded_embedding_widths_are_lossless():
    """Draft and target with embedding matrices of different sizes (padding rows)."""
    wide, narrow = tiny_model("llama", seed=0, vocab_size=104), tiny_model("llama", vocab_size=96)
    input_ids, attention_mask = left_padded([6, 4])
    for target, draft in ((wide, narrow), (narrow, wide)):
        reference = hf_greedy(target, input_ids, attention_mask, MAX_NEW).tolist()
        for gamma in (2, 5):
            result = speculative_generate(
                target, draft, input_ids, attention_mask, gamma=gamma, max_new_tokens=MAX_NEW
            )
            assert result.sequences == reference
    assert any(
        token >= 96
        for row in hf_greedy(wide, input_ids, attention_mask, MAX_NEW).tolist()
        for token in row
    ), "the wide target should use its extra rows in this test"


def test_generator_makes_sampling_reproducible(models):
    target, draft = models["target"], models["partial"]
    input_ids, attention_mask = left_padded([5, 7])
    runs = [
        speculative_generate(
            target,
            draft,
            input_ids,
            attention_mask,
            gamma=3,
            max_new_tokens=16,
            temperature=1.0,
            generator=torch.Generator().manual_seed(11),
        ).sequences
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attention_implementations_agree(attention):
    """Our 4-D masks are built per attention implementation (bool for sdpa, additive for eager)."""
    target = tiny_model("qwen2", seed=0, attn_implementation=attention)
    draft = perturbed_copy(target, 0.1)
    input_ids, attention_mask = left_padded([6, 2, 9])
    reference = hf_greedy(target, input_ids, attention_mask, MAX_NEW).tolist()
    result = speculative_generate(
        target, draft, input_ids, attention_mask, gamma=3, max_new_tokens=MAX_NEW
    )
    assert target.config._attn_implementation == attention
    assert result.sequences == reference

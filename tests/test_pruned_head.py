"""Pruned-vocabulary draft heads: exact logits, lossless SD, saving, loading and training."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import VOCAB, left_padded, perturbed_copy, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from distillspec import autoregressive_generate, speculative_generate
from distillspec.common.config import from_dict
from distillspec.decoding import packed_linear
from distillspec.decoding.dynamic_tree import top_children
from distillspec.decoding.kv_cache import CachedModel
from distillspec.decoding.packed_linear import packed_linears
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import draft_greedy_tokens, greedy_tokens, kept_columns, top_ids
from distillspec.models.drafts import truncate_layers
from distillspec.models.loading import load_model
from distillspec.models.pruned_head import (
    PrunedHead,
    frequent_tokens,
    full_vocabulary,
    prune_head,
    restricted_logits,
)
from distillspec.models.quantize import quantize_draft
from distillspec.training.config import DistillConfig
from distillspec.training.loop import distill


def test_pruned_logits_are_the_kept_rows_and_minus_inf_elsewhere():
    model = tiny_model("llama", seed=0)
    hidden = torch.randn(2, 3, model.config.hidden_size)
    full = model.lm_head(hidden)
    kept = torch.tensor([2, 5, 7, 40, 95])
    prune_head(model, kept)
    head = model.get_output_embeddings()
    assert isinstance(head, PrunedHead) and head.out_features == VOCAB
    logits = head(hidden)
    torch.testing.assert_close(logits[..., kept], full[..., kept])
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[kept] = False
    assert torch.isneginf(logits[..., others]).all()
    with full_vocabulary(model):
        torch.testing.assert_close(model.get_output_embeddings()(hidden), full)
    assert model.get_output_embeddings() is head


def test_restricted_logits_leave_the_model_as_it_was():
    """A target scored through a restricted head (teacher top-k, live training steps) is shared
    by several runs: afterwards its state_dict and its parameters are unchanged, so a draft can
    still be built from it (this once failed the third run in one process)."""
    model = tiny_model("llama", seed=0)
    keys, count = list(model.state_dict()), len(list(model.parameters()))
    ids = torch.tensor([1, 4, 9, 30])
    input_ids = torch.randint(0, VOCAB, (1, 5))
    with restricted_logits(model, ids):
        restricted = model(input_ids).logits
    torch.testing.assert_close(restricted, model(input_ids).logits[..., ids])
    with restricted_logits(model, ids):  # the cached head is reused, not registered
        model(input_ids)
    assert list(model.state_dict()) == keys and len(list(model.parameters())) == count
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    truncate_layers(model, 1)
    model.double()  # the cache, outside the module tree, is rebuilt in the new dtype
    with restricted_logits(model, ids):
        restricted = model(input_ids).logits
    assert restricted.dtype == torch.float64
    torch.testing.assert_close(restricted, model(input_ids).logits[..., ids])


def test_frequent_tokens_counts_ties_and_forced_ids():
    ids = frequent_tokens([[5, 5, 7], [7, 9, 5]], keep=3, vocab_size=20, always=[2])
    assert ids.tolist() == [2, 5, 7]
    assert frequent_tokens([[1]], keep=4, vocab_size=20).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="draft_vocab"):
        frequent_tokens([], keep=0, vocab_size=20)


@pytest.mark.parametrize(("gamma", "tree"), [(1, ""), (3, ""), (6, ""), (1, "3:1"),
                                           (1, "8:2"), (1, "dyn:6:3:2")])
def test_greedy_sd_with_a_pruned_draft_equals_the_target(gamma, tree, monkeypatch):
    """Chains, static and dynamic trees: the draft's argmax and top-k come from its kept
    columns (``sampling.kept_columns``, read from ``CachedModel.kept_ids``); the output is the
    target's own."""
    reads = []
    kept_ids = CachedModel.kept_ids.fget
    monkeypatch.setattr(CachedModel, "kept_ids", property(
        lambda cached: reads.append(1) or kept_ids(cached)))
    target = tiny_model("llama", seed=0)
    ids, mask = left_padded([5, 9, 3])
    plain = autoregressive_generate(target, ids, mask, max_new_tokens=20)
    used = sorted({t for row in plain.sequences for t in row})
    kept = torch.tensor(sorted(set(used[: len(used) // 2]) | {0, 1, 2, 3}))  # a strict subset
    draft = prune_head(perturbed_copy(target, 0.05), kept)
    result = speculative_generate(target, draft, ids, mask, gamma=gamma, tree=tree,
                                  max_new_tokens=20)
    assert result.sequences == plain.sequences
    assert 0 < result.metrics.acceptance_rate < 1
    assert reads, "the strategy read the draft's kept ids"


@pytest.mark.parametrize(("gamma", "tree"), [(3, ""), (1, "0,1,2,0.0,0.1,1.0"), (2, "dyn:5:2:3")])
def test_sampled_sd_with_a_pruned_draft_matches_the_target(gamma, tree):
    """Sampled chains, static and dynamic trees with a pruned draft (q is 0 off its kept ids,
    held in no particular order): the first two tokens follow the target's exact joint (the
    draft never proposes the ids it lacks; the residual emits them)."""
    from test_engine_sampled import PROMPT, N, empirical_joint, exact_two_token_joint, tv

    target = tiny_model("llama", seed=0, vocab_size=8)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.1)
    draft = prune_head(perturbed_copy(target, 0.6, seed=4), torch.tensor([6, 1, 4, 2, 7]))
    sampling = SamplingConfig(temperature=1.0)
    expected = exact_two_token_joint(target, PROMPT, sampling)
    result = speculative_generate(target, draft, PROMPT.expand(N, -1), gamma=gamma, tree=tree,
                                  max_new_tokens=2, temperature=1.0,
                                  generator=torch.Generator().manual_seed(0))
    assert tv(empirical_joint(result.sequences), expected) < 0.07
    assert 0.1 < result.metrics.total.acceptance_rate < 0.95


def test_the_kept_columns_give_the_whole_row_s_argmax_top_k_and_scores():
    """A pruned head's logits are -inf outside its kept ids: the argmax, the top-k and the
    dynamic tree's scores over the kept columns equal those over the whole row."""
    generator = torch.Generator().manual_seed(0)
    kept = torch.tensor([3, 17, 18, 40, 41, 77, 90, 120])
    logits = torch.full((2, 3, 128), float("-inf"))
    logits[..., kept] = torch.randn(2, 3, len(kept), generator=generator)
    assert torch.equal(draft_greedy_tokens(logits, kept), greedy_tokens(logits))
    for k in (1, 3, 8):
        assert torch.equal(top_ids(logits, k, kept), torch.topk(logits, k, dim=-1).indices)
    assert torch.equal(top_ids(logits, 9, kept)[..., :8], torch.topk(logits, 8).indices)
    parents = torch.randn(2, 3, generator=generator).double()
    ours, whole = top_children(logits, parents, 4, kept), top_children(logits, parents, 4)
    assert torch.equal(ours[0], whole[0])
    torch.testing.assert_close(ours[1], whole[1])
    assert torch.equal(kept_columns(logits, None), logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pruned_head_decodes_on_packed_weights_with_the_same_logits(dtype):
    """Decoding runs the kept rows through the packed call (``PrunedHead.PACKED_CALL``) like
    any linear layer: the same logits (bit for bit in bf16), restored on leaving."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 kernels here")
    model = prune_head(tiny_model("llama", seed=0), torch.tensor([0, 2, 5, 9, 33, 64])).to(dtype)
    head = model.get_output_embeddings()
    input_ids, attention_mask = left_padded([5, 8])
    with torch.inference_mode():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        packed_linear._by_storage.pop(head.weight.data_ptr(), None)
        with packed_linears(model):
            assert "kept_logits" in head.__dict__
            packed = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert head.weight.data_ptr() in packed_linear._by_storage  # the packed call ran
    assert "kept_logits" not in head.__dict__
    if dtype == torch.bfloat16:
        assert torch.equal(packed, expected)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a head changed in place (a new version) is packed again
        head.weight.mul_(-1.0)
    with torch.inference_mode(), packed_linears(model):
        flipped = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(flipped), finite)
    assert not torch.allclose(flipped[finite], expected[finite])


def test_sampled_sd_with_a_strict_subset_support_matches_the_target():
    """Two-token joint distribution, enumerated exactly, vs 4000 SD samples."""
    from test_engine_sampled import (
        PROMPT,
        exact_two_token_joint,
        sampled_two_tokens,
        softened_target,
        tv,
    )

    from distillspec.decoding.params import SamplingConfig

    target = softened_target()
    draft = prune_head(perturbed_copy(target, 0.3, seed=4), torch.tensor([0, 2, 3, 5, 6]))
    expected = exact_two_token_joint(target, PROMPT, SamplingConfig(temperature=1.0))
    observed, result = sampled_two_tokens(target, draft)
    drafted = {t for row in result.sequences for t in row}
    assert {1, 4, 7} & drafted, "ids the draft cannot propose still come out (from the residual)"
    assert tv(observed, expected) < 0.07


def test_distilled_pruned_draft_saves_full_loads_pruned_and_assists_transformers(tmp_path):
    save_tiny(tmp_path / "target", layers=3, lm_scale=10.0)
    rng = random.Random(0)
    with (tmp_path / "data.jsonl").open("w") as handle:
        for _ in range(24):
            words = " ".join(f"w{rng.randrange(0, 60)}" for _ in range(rng.randrange(2, 5)))
            handle.write(json.dumps({"prompt": words}) + "\n")
    out = tmp_path / "run"
    config = from_dict(DistillConfig, dict(
        target=str(tmp_path / "target"), draft_init="target-layers:1:vocab=24",
        data=str(tmp_path / "data.jsonl"), policy="teacher", teacher_cache=True,
        sample_temperature=0.0, max_steps=6, batch_size=4, max_new_tokens=6, lr=1e-3,
        warmup_steps=1, eval_every=0, save_every=3, eval_prompts=4, eval_tau_prompts=2,
        eval_max_new_tokens=6, held_out=4, output_dir=str(out), runtime={"device": "cpu"},
        bf16="off",
    ))
    distill(config)
    draft, _ = load_model(out / "final", device="cpu", dtype="float32")
    head = draft.get_output_embeddings()
    assert isinstance(head, PrunedHead) and head.weight.shape[0] == 24
    plain_draft = AutoModelForCausalLM.from_pretrained(out / "final")  # full head, no warnings
    assert plain_draft.lm_head.weight.shape[0] == VOCAB
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "target")
    ids = torch.tensor([[5, 9, 13, 40]])
    reference = target.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assisted = target.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0,
                               assistant_model=plain_draft)
    assert torch.equal(reference, assisted)
    ours = speculative_generate(target, draft, ids, gamma=3, max_new_tokens=10)
    assert ours.sequences[0] == reference[0, 4:].tolist()
    # resume from a pruned checkpoint keeps training the same head
    distill(from_dict(DistillConfig, {**config.__dict__, "runtime": {"device": "cpu"},
                                      "max_steps": 8, "resume": True}))
    assert json.loads((out / "rank-0.json").read_text())["step"] == 8


def test_an_int8_pruned_head_has_nothing_to_pack_and_ids_must_be_distinct():
    model = prune_head(tiny_model("llama", seed=0), torch.tensor([0, 2, 5, 9, 33, 64]))
    head = model.get_output_embeddings()
    assert head in packed_linear._linears(model)
    quantize_draft(model, "int8")
    assert head.PACKED_CALL is None and head not in packed_linear._linears(model)
    with pytest.raises(ValueError, match="distinct"):
        PrunedHead(torch.zeros(3, 4), torch.tensor([1, 5, 1]), torch.zeros(8, 4))

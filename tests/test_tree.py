"""Tree drafting: the pure parts (shape, best-first order, the greedy tree rule) and the engine
(greedy tree SD equals the target's own greedy decoding token for token, in float32)."""

from __future__ import annotations

import pytest
import test_engine_greedy
import torch
from conftest import left_padded, tiny_model
from test_engine_greedy import MAX_NEW, hf_greedy, strip_after_eos

from distillspec import Decoder, Request, speculative_generate
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.decoding.tree import Tree, accept_tree_greedy, best_first, tree_node_tokens

models = test_engine_greedy.models  # the same fixture: same / random / partial drafts, two archs
TREES = ["1", "4", "0,1,0.0,0.1,1.0,0.0.0", "8:2", "15:2", "12"]


def test_paths_parse_order_and_relations():
    tree = Tree.parse("0.1,1,0,0.0")
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1))
    assert tree.parent == (-1, -1, 0, 0)
    assert tree.rank == (0, 1, 0, 1)
    assert tree.depth == 2 and tree.internal == (0,)
    assert tree.children_topk(0) == ((2, 3), 2)
    visible = tree.ancestors([-1, 0, 1, 2, 3])
    assert visible[3].tolist() == [True, True, False, True, False]  # (0,0) sees root, (0,), itself
    assert visible[2].tolist() == [True, False, True, False, False]
    assert Tree.parse("") is None and Tree.parse("  ") is None
    assert Tree.parse("0/1/0.1/0.0") == tree  # '/' joins paths where commas split lists


@pytest.mark.parametrize("spec, message", [
    ("0.0", "no parent"), ("0,0", "repeat"), ("a,b", "rank paths"), ("0,-1", "ranks"),
    ("0", "1..64 nodes"), ("65", "1..64 nodes"), ("3:0", "depth"), ("0,1,1.0", None),
])
def test_bad_trees_are_refused_with_what_to_do(spec, message):
    if message is None:
        Tree.parse(spec)
        return
    with pytest.raises(ValueError, match=message):
        Tree.parse(spec)


def test_tree_knob_is_checked_before_anything_loads():
    with pytest.raises(ValueError, match="no parent"):
        SpeculationConfig(tree="1.0")
    with pytest.raises(ValueError, match="must be a string"):
        SpeculationConfig(tree=None)
    # lenience applies to the sampled steps, which run the chain; greedy steps use the tree
    SpeculationConfig(tree="4", lenience="lin", epsilon=0.5)


def test_best_first_takes_the_most_likely_paths():
    assert best_first(3, profile=(0.5, 0.3, 0.1)).paths == ((0,), (1,), (0, 0))
    assert best_first(4, max_depth=1, profile=(0.5, 0.3, 0.1, 0.05)).paths == (
        (0,), (1,), (2,), (3,))
    tree = best_first(15, 2)
    assert tree.size == 15 and tree.depth == 2 and (0,) in tree.paths


def test_node_tokens_are_the_draft_top_k():
    tree = Tree.parse("0,1,2")
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, float("-inf")]])
    tokens = torch.zeros(1, 3, dtype=torch.long)
    tree_node_tokens(tree, logits, -1, tokens)
    assert tokens.tolist() == [[1, 3, 0]]


def test_greedy_tree_rule_walks_the_matching_children():
    tree = Tree.parse("0,1,0.0,1.0")  # nodes: (0,) (1,) (0,0) (1,0)
    node_tokens = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    # target argmax after root, node0, node1, node2, node3
    target = torch.tensor([[6, 0, 8, 0, 9],   # root -> 6 = node1, then 8 = node3, bonus 9
                           [4, 0, 0, 0, 0],   # nothing matches: correction 4
                           [5, 7, 0, 3, 0]])  # node0, node2, bonus 3
    path, count, next_tokens = accept_tree_greedy(tree, node_tokens, target)
    assert count.tolist() == [2, 0, 2]
    assert path.tolist() == [[1, 3], [-1, -1], [0, 2]]
    assert next_tokens.tolist() == [9, 4, 3]
    path, count, next_tokens = accept_tree_greedy(tree, node_tokens, target, torch.tensor([1, 2, 0]))
    assert count.tolist() == [1, 0, 0] and next_tokens.tolist() == [8, 4, 5]


@pytest.mark.parametrize("lengths", [[7], [5, 11, 2, 8]], ids=["batch1", "batch4-ragged"])
@pytest.mark.parametrize("draft_kind", ["same", "random", "partial"])
def test_greedy_tree_equals_target(models, draft_kind, lengths):
    target, draft = models["target"], models[draft_kind]
    input_ids, attention_mask = left_padded(lengths)
    reference = hf_greedy(target, input_ids, attention_mask, MAX_NEW).tolist()
    for spec in TREES:
        result = speculative_generate(target, draft, input_ids, attention_mask, gamma=4,
                                      tree=spec, max_new_tokens=MAX_NEW)
        assert result.sequences == reference, f"tree={spec}"
        total = result.metrics.total
        if draft_kind == "same":  # the top-1 path is always right: a full depth per block
            assert total.acceptance_rate == 1.0
            assert total.block_efficiency > Tree.parse(spec).depth


def test_a_tree_accepts_more_than_its_top1_chain(models):
    target, draft = models["target"], models["partial"]
    input_ids, attention_mask = left_padded([9, 4], seed=2)
    chain = speculative_generate(target, draft, input_ids, attention_mask, gamma=2,
                                 tree="0,0.0", max_new_tokens=MAX_NEW).metrics.total
    tree = speculative_generate(target, draft, input_ids, attention_mask, gamma=2,
                                tree="15:2", max_new_tokens=MAX_NEW).metrics.total
    assert tree.block_efficiency > chain.block_efficiency
    assert tree.target_calls < chain.target_calls


def test_tree_rows_stop_at_eos_and_budget(models):
    target, draft = models["target"], models["partial"]
    input_ids, attention_mask = left_padded([6, 3, 9], seed=3)
    plain = hf_greedy(target, input_ids, attention_mask, MAX_NEW).tolist()
    eos = plain[0][5]
    reference = strip_after_eos(hf_greedy(target, input_ids, attention_mask, MAX_NEW, eos).tolist(),
                                eos)
    for budget in (1, 2, 5):
        result = speculative_generate(target, draft, input_ids, attention_mask, gamma=4,
                                      tree="12", max_new_tokens=budget, eos_token_id=eos)
        assert result.sequences == [row[:budget] for row in reference]
    result = speculative_generate(target, draft, input_ids, attention_mask, gamma=4, tree="12",
                                  max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert result.sequences == reference


def test_tree_rows_joining_mid_run_and_sampled_rows_use_the_chain(models):
    target, draft = models["target"], models["partial"]
    decoder = Decoder(target, draft, SpeculationConfig(gamma=3, tree="8:2"))
    prompts = [left_padded([n], seed=n)[0][0].tolist() for n in (5, 8, 3)]
    alone = [speculative_generate(target, draft, torch.tensor([p]), gamma=3, tree="8:2",
                                  max_new_tokens=MAX_NEW).sequences[0] for p in prompts]
    outputs = {}
    decoder.add(Request(prompts[0], MAX_NEW, request_id=0))
    for step in range(200):
        if step == 2:
            decoder.add(Request(prompts[1], MAX_NEW, request_id=1))
        if step == 4:
            decoder.add(Request(prompts[2], MAX_NEW, request_id=2))
        for update in decoder.step():
            outputs.setdefault(update.request_id, []).extend(update.new_tokens)
        if not decoder.has_work and step > 4:
            break
    assert [outputs[i] for i in range(3)] == alone
    # a sampled row in the batch: the block is a chain (lossless sampling), greedy rows unchanged
    decoder = Decoder(target, draft, SpeculationConfig(gamma=3, tree="8:2"))
    decoder.add(Request(prompts[0], MAX_NEW, request_id=0))
    decoder.add(Request(prompts[1], MAX_NEW, SamplingConfig(temperature=1.0), request_id=1,
                        seed=3))
    outputs = {}
    while decoder.has_work:
        for update in decoder.step():
            outputs.setdefault(update.request_id, []).extend(update.new_tokens)
    assert outputs[0] == alone[0] and len(outputs[1]) == MAX_NEW


def test_long_ragged_tree_runs_compact_and_stay_exact(models, monkeypatch):
    """Rows keep different path lengths, so holes build up until the caches compact (mid-run,
    right before a tree block): the output must still be the target's."""
    from distillspec.decoding import kv_cache

    target, draft = models["target"], models["partial"]
    input_ids, attention_mask = left_padded([5, 11, 2, 8], seed=4)
    reference = hf_greedy(target, input_ids, attention_mask, 200).tolist()
    compactions = []
    original = kv_cache._SlotLayer.gather_slots

    def counting(self, order):
        compactions.append(order.shape)
        return original(self, order)

    monkeypatch.setattr(kv_cache._SlotLayer, "gather_slots", counting)
    result = speculative_generate(target, draft, input_ids, attention_mask, gamma=1,
                                  tree="15:2", max_new_tokens=200)
    assert result.sequences == reference
    assert compactions  # the run did compact


def test_tree_needs_a_4d_mask_and_says_so_before_decoding(models):
    target = tiny_model("llama", seed=0)
    target.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager"):
        Decoder(target, models["partial"], SpeculationConfig(tree="4"))
    Decoder(target, models["partial"], SpeculationConfig())  # chains keep the 2-D mask path


def test_tree_alpha_counts_only_levels_where_the_top1_token_was_proposed(models):
    """In "0,1,1.0" the top-1 node is a leaf: after accepting it nothing was proposed at the
    next level, so that level is not counted as a miss (the same model agrees everywhere)."""
    target, draft = models["target"], models["same"]
    input_ids, attention_mask = left_padded([6])
    total = speculative_generate(target, draft, input_ids, attention_mask, gamma=1,
                                 tree="0,1,1.0", max_new_tokens=MAX_NEW).metrics.total
    assert total.accepted_tokens > 0 and total.analytic_alpha == 1.0

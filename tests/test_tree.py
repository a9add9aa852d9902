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
    assert tree.level_widths == (2, 2)  # the root's 2 children; node (0,)'s 2
    assert Tree.parse("0,1,2,0.0,1.0").level_widths == (3, 1)  # no node at depth 1 has 2
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
    # lenience applies to the sampled rows' rule (chain or tree); greedy rows are exact
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


def trees_equal_target(models, draft_kind, lengths, specs):
    """Each tree's greedy SD output equals transformers' greedy decoding of the target (fp32);
    yields ``(spec, result)`` for further checks."""
    target, draft = models["target"], models[draft_kind]
    input_ids, attention_mask = left_padded(lengths)
    reference = hf_greedy(target, input_ids, attention_mask, MAX_NEW).tolist()
    for spec in specs:
        result = speculative_generate(target, draft, input_ids, attention_mask, gamma=4,
                                      tree=spec, max_new_tokens=MAX_NEW)
        assert result.sequences == reference, f"tree={spec}"
        yield spec, result


@pytest.mark.parametrize("lengths", [[7], [5, 11, 2, 8]], ids=["batch1", "batch4-ragged"])
@pytest.mark.parametrize("draft_kind", ["same", "random", "partial"])
def test_greedy_tree_equals_target(models, draft_kind, lengths):
    for spec, result in trees_equal_target(models, draft_kind, lengths, TREES):
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


def test_tree_rows_joining_mid_run_produce_what_they_produce_alone(models):
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


SAMPLED = SamplingConfig(temperature=1.0, top_p=0.9)


def run_rows(target, draft, plan, tree="8:2"):
    """``plan``: (step it joins, prompt, sampling, seed) per row; returns each row's output and
    accepted lengths, by row index."""
    decoder = Decoder(target, draft, SpeculationConfig(gamma=3, tree=tree),
                      generator=torch.Generator().manual_seed(0))
    step = 0
    while step <= max(p[0] for p in plan) or decoder.has_work:
        for index, (join, prompt, sampling, seed) in enumerate(plan):
            if join == step:
                decoder.add(Request(prompt, MAX_NEW, sampling, seed=seed, request_id=index))
        decoder.step()
        step += 1
    rows = sorted(decoder.finished, key=lambda row: row.request.request_id)
    return [(row.output, row.counts.accepted_lengths) for row in rows]


@pytest.mark.parametrize("tree", ["8:2", "0,1,2,0.0,0.1,1.0,0.0.0", ""])
def test_greedy_rows_keep_their_tree_path_beside_sampled_rows(models, tree):
    """Per-row modes: sampled rows (seeded or not) in the batch leave a greedy row's tokens and
    its accepted length at every block exactly as when it decodes alone, which is the target's
    own greedy output (before, one sampled row sent every row back to the chain). Tree "" is
    the chain, where greedy rows in a mixed block use one-hot p and q: the same decisions."""
    target, draft = models["target"], models["partial"]
    prompts = [left_padded([n], seed=n)[0][0].tolist() for n in (5, 8, 3, 6)]
    plan = [(0, prompts[0], SamplingConfig(), None), (0, prompts[1], SAMPLED, 4),
            (1, prompts[2], SamplingConfig(), None), (0, prompts[3], SAMPLED, None)]
    mixed = run_rows(target, draft, plan, tree)
    for index in (0, 2):
        alone = run_rows(target, draft, [(0, prompts[index], SamplingConfig(), None)], tree)
        assert mixed[index] == alone[0], f"row {index}"
        reference = hf_greedy(target, torch.tensor([prompts[index]]), None, MAX_NEW).tolist()
        assert mixed[index][0] == reference[0]
    assert all(len(output) == MAX_NEW for output, _ in mixed)


def test_seeded_sampled_tree_rows_are_what_they_are_alone(models):
    """A seeded sampled row draws its nodes and decisions from its own generator only: joining
    mid-run beside greedy and other sampled rows, it emits what it emits alone."""
    target, draft = models["target"], models["partial"]
    prompts = [left_padded([n], seed=n)[0][0].tolist() for n in (4, 9, 2, 7)]
    plan = [(0, prompts[0], SAMPLED, 1), (0, prompts[1], SamplingConfig(), None),
            (2, prompts[2], SamplingConfig(temperature=0.7, top_k=20), 2),
            (3, prompts[3], SAMPLED, None)]
    mixed = run_rows(target, draft, plan)
    for index in (0, 2):
        join, prompt, sampling, seed = plan[index]
        assert mixed[index] == run_rows(target, draft, [(0, prompt, sampling, seed)])[0]
    assert mixed[0][0] != run_rows(target, draft, [(0, prompts[0], SAMPLED, 5)])[0][0]
    assert any(length > 0 for _, lengths in mixed for length in lengths)


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


def test_a_tree_spec_is_parsed_once_into_a_typed_tree(models, monkeypatch):
    """The config parses ``--tree`` once into ``tree_shape`` (its text stays in ``tree`` and in
    the saved config); the decoder, its steps and a config built from the parsed tree never
    parse it again."""
    from distillspec.common.config import to_dict
    from distillspec.tools.configs import BenchConfig

    parsed = []
    parse = Tree.parse.__func__
    monkeypatch.setattr(Tree, "parse", classmethod(
        lambda cls, spec: parsed.append(spec) or parse(cls, spec)))
    speculation = SpeculationConfig(gamma=2, tree="0/1/0.0")
    assert parsed == ["0/1/0.0"]
    assert speculation.tree_shape == Tree(((0,), (1,), (0, 0))) and speculation.tree == "0/1/0.0"
    assert to_dict(speculation)["tree"] == "0/1/0.0"  # saved configs keep the text
    again = SpeculationConfig(gamma=3, tree=speculation.tree_shape)
    assert again.tree_shape is speculation.tree_shape and again.tree == "0/1/0.0"
    target, draft = models["target"], models["partial"]
    decoder = Decoder(target, draft, speculation)
    decoder.add(Request(left_padded([5])[0][0].tolist(), 12))
    while decoder.has_work:
        decoder.step()
    assert decoder.tree is speculation.tree_shape and parsed == ["0/1/0.0"]
    assert SpeculationConfig().tree_shape is None
    bench = BenchConfig(trees=["4:1", "0/1/0.0"])
    assert [tree.spec for tree in bench.tree_shapes] == ["4:1", "0/1/0.0"]
    assert bench.tree_shapes[1] == speculation.tree_shape and len(parsed) == 3

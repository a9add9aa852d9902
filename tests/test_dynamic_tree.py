"""Dynamic trees (EAGLE-2): the pure parts (candidate growth, the choice of nodes, the per-row
greedy rule) against hand-built cases, and the engine: greedy output equal to the target's own
in float32 for every draft, batch and budget, and beside sampled rows (which use a layout fixed
in advance; their distribution is tested in test_engine_sampled.py)."""

from __future__ import annotations

import pytest
import test_engine_greedy
import torch
from conftest import left_padded
from test_engine_greedy import MAX_NEW, hf_greedy, strip_after_eos
from test_tree import SAMPLED, run_rows, trees_equal_target

from distillspec import speculative_generate
from distillspec.decoding.dynamic_tree import (
    accept_rows_greedy,
    extend_lineage,
    node_parents,
    prior_plan,
    sees,
    select_nodes,
    top_children,
)
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.decoding.tree import DynamicTree, Tree, accept_tree_greedy

models = test_engine_greedy.models
DYNAMIC = ["dyn:1:1:1", "dyn:6:3:2", "dyn:16:5:4", "dyn:12:2:8"]


def test_dynamic_specs_parse_and_bad_ones_say_what_to_do():
    tree = Tree.parse("dyn:16:5:4")
    assert isinstance(tree, DynamicTree) and (tree.nodes, tree.depth, tree.top_k) == (16, 5, 4)
    assert tree.size == 16 and tree.spec == "dyn:16:5:4"
    assert Tree.parse("dyn:8") == DynamicTree(8, 5, 4)
    assert tree.candidates == 4 + 4 * 16
    assert SpeculationConfig(tree="dyn:16:5:4").tree_shape == tree
    for spec, message in [("dyn:", "dyn:N"), ("dyn:x", "dyn:N"), ("dyn:1:2:3:4", "dyn:N"),
                          ("dyn:0", "nodes"), ("dyn:65", "nodes"), ("dyn:8:1:4", "fewer than"),
                          ("dyn:4:0:2", "depth"), ("dyn:4:2:0", "top-k")]:
        with pytest.raises(ValueError, match=message):
            SpeculationConfig(tree=spec)


def test_top_children_scores_are_path_log_probabilities():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]])
    parent_scores = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    tokens, scores = top_children(logits, parent_scores, 2)
    assert tokens.tolist() == [[2, 1, 0, 1]]
    logq = torch.log_softmax(logits.double(), dim=-1)
    expected = [-1 + logq[0, 0, 2], -1 + logq[0, 0, 1], -2 + logq[0, 1, 0], -2 + logq[0, 1, 1]]
    assert torch.allclose(scores[0], torch.stack(expected), atol=1e-6)


def test_lineage_visibility_and_choice_keep_every_ancestor():
    """Level 1: candidates 0, 1 (root's children); level 2: 2, 3 under 1 and 4, 5 under 0."""
    lineage = extend_lineage(None, torch.full((1, 2), -1), 0, 1, 3)
    lineage = extend_lineage(lineage, torch.tensor([[1, 1, 0, 0]]), 2, 2, 3)
    depths = torch.tensor([[1, 1, 2, 2, 2, 2]])
    everyone = torch.arange(6).unsqueeze(0)
    visible = sees(lineage, everyone, everyone, depths)[0].int().tolist()
    assert visible == [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0],
                       [0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]]
    # candidate 2 (under 1) scores higher than 0 and its parent 1 ties 2: the parent comes first
    scores = torch.tensor([[-3.0, -1.0, -1.0, -9.0, -4.0, -5.0]], dtype=torch.float64)
    chosen = select_nodes(scores, depths, 3)
    assert chosen.tolist() == [[0, 1, 2]]
    assert node_parents(chosen, torch.tensor([[-1, -1, 1, 1, 0, 0]])).tolist() == [[-1, -1, 1]]


def test_per_row_rule_equals_the_static_rule_on_a_static_tree():
    """With every row's tree the same static tree, the per-row rule decides as the static one."""
    tree = Tree.parse("0,1,2,0.0,0.1,1.0,0.0.0")
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        node_tokens = torch.randint(0, 3, (6, tree.size), generator=generator)
        node_tokens[:, [0, 1, 2]] = torch.tensor([0, 1, 2])  # siblings distinct
        node_tokens[:, [3, 4]] = torch.tensor([0, 1])
        target = torch.randint(0, 3, (6, tree.size + 1), generator=generator)
        cap = torch.randint(0, 4, (6,), generator=generator)
        parents = torch.tensor(tree.parent).expand(6, -1)
        mine = accept_rows_greedy(parents, node_tokens, target, tree.depth, cap)
        static = accept_tree_greedy(tree, node_tokens, target, cap)
        assert all(torch.equal(a, b) for a, b in zip(mine, static))


@pytest.mark.parametrize("lengths", [[7], [5, 11, 2, 8]], ids=["batch1", "batch4-ragged"])
@pytest.mark.parametrize("draft_kind", ["same", "random", "partial"])
def test_dynamic_tree_equals_target(models, draft_kind, lengths):
    for _, result in trees_equal_target(models, draft_kind, lengths, DYNAMIC):
        total = result.metrics.total
        if draft_kind == "same":  # the root's top-1 child scores highest: always chosen, right
            assert all(min(row.accepted_lengths[:-1]) >= 1 for row in result.metrics.rows)
            assert total.analytic_alpha == 1.0  # every top-1 node verified was accepted


def test_dynamic_tree_accepts_more_than_a_static_tree_of_its_budget(models):
    """A partly trained draft: the tree shaped by its own confidence gains more per block than
    the fixed best-first tree with as many nodes and as deep (same draft, same prompts)."""
    target, draft = models["target"], models["partial"]
    input_ids, attention_mask = left_padded([9, 4, 6], seed=2)
    per_block = {}
    for spec in ("dyn:12:4:4", "12:4"):
        total = speculative_generate(target, draft, input_ids, attention_mask, gamma=4,
                                     tree=spec, max_new_tokens=MAX_NEW).metrics.total
        per_block[spec] = total.block_efficiency
    assert per_block["dyn:12:4:4"] > per_block["12:4"]


def test_dynamic_tree_rows_stop_at_eos_and_budget_and_compact(models):
    target, draft = models["target"], models["partial"]
    input_ids, attention_mask = left_padded([6, 3, 9], seed=3)
    plain = hf_greedy(target, input_ids, attention_mask, MAX_NEW).tolist()
    eos = plain[0][5]
    reference = strip_after_eos(hf_greedy(target, input_ids, attention_mask, MAX_NEW, eos).tolist(),
                                eos)
    for budget in (1, 2, 5, MAX_NEW):
        result = speculative_generate(target, draft, input_ids, attention_mask, gamma=4,
                                      tree="dyn:10:3:3", max_new_tokens=budget, eos_token_id=eos)
        assert result.sequences == [row[:budget] for row in reference]
    long_reference = hf_greedy(target, input_ids, attention_mask, 160).tolist()
    result = speculative_generate(target, draft, input_ids, attention_mask, gamma=4,
                                  tree="dyn:10:3:3", max_new_tokens=160)
    assert result.sequences == long_reference


def test_prior_plan_is_a_static_tree_that_fits_the_dynamic_layout():
    """Sampled rows' layout: chosen by the rank profile, not by any row's q; its tree is the
    same nodes as rank paths (rank r = the r-th draw), parents before children."""
    plan = prior_plan(16, 5, 4)
    assert plan.tree.size == 16 and plan.tree.depth <= 5
    assert all(len(picked) == 4 for picked in plan.picks) and len(plan.picks) == 4
    assert sorted(plan.order) == list(range(16))
    assert plan.tree.paths[:4] == ((0,), (1,), (2,), (3,))  # the root's four draws first
    small = prior_plan(6, 2, 3)
    assert small.tree == Tree.parse("0,1,2,0.0,0.1,1.0")


@pytest.mark.parametrize("tree", ["dyn:8:3:3", "dyn:6:2:3"])
def test_greedy_rows_keep_their_dynamic_path_beside_sampled_rows(models, tree):
    """Per-row modes in a dynamic tree block: sampled rows (seeded or not, joining mid-run)
    leave a greedy row's tokens and its accepted length at every block exactly as when it
    decodes alone, which is the target's own greedy output; a seeded sampled row emits what it
    emits alone, and another seed changes it (the control)."""
    target, draft = models["target"], models["partial"]
    prompts = [left_padded([n], seed=n)[0][0].tolist() for n in (5, 8, 3, 6)]
    plan = [(0, prompts[0], SamplingConfig(), None), (0, prompts[1], SAMPLED, 4),
            (1, prompts[2], SamplingConfig(), None), (2, prompts[3], SAMPLED, None)]
    mixed = run_rows(target, draft, plan, tree)
    for index in (0, 2):
        alone = run_rows(target, draft, [(0, prompts[index], SamplingConfig(), None)], tree)
        assert mixed[index] == alone[0], f"row {index}"
        reference = hf_greedy(target, torch.tensor([prompts[index]]), None, MAX_NEW).tolist()
        assert mixed[index][0] == reference[0]
    alone = run_rows(target, draft, [(0, prompts[1], SAMPLED, 4)], tree)
    assert mixed[1] == alone[0]
    assert mixed[1][0] != run_rows(target, draft, [(0, prompts[1], SAMPLED, 5)], tree)[0][0]
    assert all(len(output) == MAX_NEW for output, _ in mixed)
    assert any(length > 0 for _, lengths in mixed[1::2] for length in lengths)

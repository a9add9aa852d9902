"""The dynamic tree strategy (``--tree dyn:N:D:K``, EAGLE-2): each greedy row grows a tree of
its own every block, shaped by the draft's confidence, and the target verifies all rows' trees in
one pass (a per-row mask and per-row positions).

Draft: ``D`` calls, every row feeding the same number of nodes (``K`` per call after the first),
so the shapes repeat block after block. Verify: the ``N`` candidates of highest path probability
per row, each seeing its ancestors. The rule is the greedy tree rule, per row
(``dynamic_tree.accept_rows_greedy``): the output is the target's greedy decoding, whatever the
trees. A block with a sampled row runs the static tree of the same budget (``DynamicTree``'s
docstring says why) through ``tree_step.TreeStep``, every row with its own rule.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from distillspec.decoding.dynamic_tree import (
    accept_rows_greedy,
    extend_lineage,
    node_parents,
    sees,
    select_nodes,
    top_children,
)
from distillspec.decoding.kv_cache import TreeCall
from distillspec.decoding.requests import RowUpdate, _Row
from distillspec.decoding.sampling import greedy_tokens
from distillspec.decoding.strategy import Models, pending_tokens
from distillspec.decoding.tree import DynamicTree
from distillspec.decoding.tree_step import TreeBlock, TreeStep, finish_tree_block


class _Candidates(NamedTuple):
    """A block's candidates per row, in proposal order: ``[B, C]`` each (``lineage [B, C, D]``),
    and ``fed [B, F]``: the candidates written to the draft's cache, in slot order."""

    tokens: torch.Tensor
    scores: torch.Tensor
    parents: torch.Tensor
    ranks: torch.Tensor
    lineage: torch.Tensor
    fed: torch.Tensor


class DynamicTreeStep:
    """One dynamic tree block for every row (``Strategy``)."""

    def __init__(self, models: Models, tree: DynamicTree):
        self.static = TreeStep(models, tree.static)  # checks the attention mask path, too
        self.models, self.tree = models, tree
        self.last_position = self.static.last_position
        k, device = tree.top_k, models.device
        # Candidate depths and ranks among siblings, in proposal order (the same for every row).
        depths = [1] * k + [d for d in range(2, tree.depth + 1) for _ in range(k * k)]
        self.depths = torch.tensor(depths, device=device)
        self.ranks = torch.arange(k, device=device).repeat(1 + (tree.depth - 1) * k)

    @property
    def lookahead(self) -> int:
        return self.tree.depth

    def step(self, rows: list[_Row], caps: list[int]) -> list[RowUpdate]:
        if any(not row.request.sampling.greedy for row in rows):
            return self.static.step(rows, caps)
        models = self.models
        candidates, draft_start, calls = models.measure("draft", self._draft, rows)
        chosen = select_nodes(candidates.scores, self.depths.unsqueeze(0), self.tree.nodes)
        target_start, logits, outcome = models.measure(
            "target", self._verify, rows, candidates, chosen, caps)
        fed = torch.nn.functional.pad(candidates.fed, (0, 1), value=-1)  # a column if none fed
        on_fed = chosen.unsqueeze(2) == fed.unsqueeze(1)  # [B, N, F + 1]
        slots = torch.where(on_fed.any(dim=2), on_fed.to(torch.int8).argmax(dim=2), -1)
        block = TreeBlock(candidates.tokens.gather(1, chosen), slots, outcome, calls)
        return finish_tree_block(models, rows, caps, block, logits, (target_start, draft_start))

    def _draft(self, rows: list[_Row]) -> tuple[_Candidates, int, int]:
        """Grow every row's candidates: the draft reads the pending tokens, then ``D - 1``
        times feeds the ``K`` best candidates of the newest level (each seeing its ancestors
        among the nodes fed) and proposes ``K`` children of each. Returns the candidates, the
        first draft slot holding a node and the call count."""
        tree, draft, device = self.tree, self.models.draft, self.models.device
        k, batch = tree.top_k, len(rows)
        draft.make_room(max(len(row.draft_pending) for row in rows) + (tree.depth - 1) * k)
        tokens, pads = pending_tokens(rows, device)
        logits = draft.forward(tokens, pads, logits_to_keep=1)[:, -1:]
        root = torch.zeros(batch, 1, dtype=torch.float64, device=device)
        first_tokens, first_scores = top_children(logits, root, k)
        token_parts, score_parts = [first_tokens], [first_scores]
        parents = [torch.full((batch, k), -1, dtype=torch.long, device=device)]
        lineage = extend_lineage(None, parents[0], 0, 1, tree.depth)
        start, fed, newest = draft.length, [], 0
        for depth in range(1, tree.depth):
            picked = torch.topk(score_parts[-1], k, dim=1).indices + newest  # [B, K]
            fed_index = torch.cat([*fed, picked], dim=1)
            visible = sees(lineage, picked, fed_index, self.depths[fed_index])
            offsets = torch.full((batch, k), depth - 1, dtype=torch.long, device=device)
            call = TreeCall(start, offsets, visible, self.last_position)
            scores = torch.cat(score_parts, dim=1)
            logits = draft.forward(torch.cat(token_parts, dim=1).gather(1, picked), tree=call,
                                   logits_to_keep=k)
            new_tokens, new_scores = top_children(logits, scores.gather(1, picked), k)
            newest = scores.shape[1]
            token_parts.append(new_tokens)
            score_parts.append(new_scores)
            parents.append(picked.repeat_interleave(k, dim=1))
            lineage = extend_lineage(lineage, parents[-1], newest, depth + 1, tree.depth)
            fed.append(picked)
        fed_all = torch.cat(fed, dim=1) if fed else torch.zeros(batch, 0, dtype=torch.long,
                                                                  device=device)
        candidates = _Candidates(torch.cat(token_parts, dim=1), torch.cat(score_parts, dim=1),
                                 torch.cat(parents, dim=1), self.ranks.expand(batch, -1),
                                 lineage, fed_all)
        return candidates, start, tree.depth

    def _verify(self, rows: list[_Row], candidates: _Candidates, chosen: torch.Tensor,
                caps: list[int]):
        """One target pass over ``[pending, chosen nodes]`` per row (node n at its depth past the
        pending token, seeing its ancestors), then the greedy rule; returns the first slot
        written, the logits and ``(path, num_accepted, next_tokens, alpha_sum, levels)``."""
        models, tree = self.models, self.tree
        batch, device = chosen.shape[0], models.device
        models.target.make_room(tree.nodes + 1)
        start = models.target.length
        depths = self.depths[chosen]  # [B, N]
        visible = torch.ones(batch, tree.nodes + 1, tree.nodes + 1, dtype=torch.bool,
                             device=device)
        visible[:, 0, 1:] = False  # the pending token sees only itself among the new slots
        visible[:, 1:, 1:] = sees(candidates.lineage, chosen, chosen, depths)
        offsets = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=device), depths], 1)
        pending = torch.tensor([[row.target_pending] for row in rows], device=device)
        node_tokens = candidates.tokens.gather(1, chosen)
        call = TreeCall(start, offsets, visible, self.last_position)
        logits = models.target.forward(torch.cat([pending, node_tokens], dim=1), tree=call)
        parents = node_parents(chosen, candidates.parents)
        max_accepted = torch.tensor(caps, device=device)
        path, count, next_tokens = accept_rows_greedy(
            parents, node_tokens, greedy_tokens(logits), tree.depth, max_accepted)
        alpha = self._greedy_alpha(parents, candidates.ranks.gather(1, chosen), path, count,
                                   max_accepted)
        return start, logits, (path, count, next_tokens, *alpha)

    @staticmethod
    def _greedy_alpha(parents, ranks, path, count, max_accepted):
        """Accepted nodes that were their parent's top-1 draft token, over the levels verified
        where a top-1 child was in the tree (as ``TreeStep._greedy_alpha``), ``[B]`` each."""
        rank0 = ranks == 0
        on_path = path >= 0
        top1 = (rank0.gather(1, path.clamp_min(0)) & on_path).sum(dim=1)
        has_top1 = torch.zeros(parents.shape[0], parents.shape[1] + 1, dtype=torch.int8,
                               device=parents.device)  # by input column: 0 = the root
        has_top1.scatter_reduce_(1, parents + 1, rank0.to(torch.int8), reduce="amax")
        last = path.gather(1, (count - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
        last = torch.where(count > 0, last + 1, 0)  # input column of the last accepted node
        proposed = has_top1.gather(1, last.unsqueeze(1)).squeeze(1) > 0
        return top1.double(), count + ((count < max_accepted) & proposed).long()

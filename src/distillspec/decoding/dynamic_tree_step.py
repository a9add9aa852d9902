"""The dynamic tree strategy (``--tree dyn:N:D:K``, EAGLE-2): each greedy row grows a tree of
its own every block, shaped by the draft's confidence, and the target verifies all rows' trees in
one pass (a per-row mask and per-row positions).

Draft: ``D`` calls, every row feeding the same number of nodes (``K`` per call after the first),
so the shapes repeat block after block. Verify: the ``N`` candidates of highest path probability
per row, each seeing its ancestors. Greedy rows: the greedy tree rule per row
(``dynamic_tree.accept_rows_greedy``), so the output is the target's greedy decoding whatever the
trees. Sampled rows share the block with a layout fixed in advance (``dynamic_tree.prior_plan``:
children are draws without replacement of the row's warped q, fed and verified by index, never
by their q) and the multi-draft rule (``acceptance.verify_tree``) on that static tree.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from distillspec.decoding.dynamic_tree import (
    accept_rows_greedy,
    extend_lineage,
    node_parents,
    prior_plan,
    sees,
    select_nodes,
    top_children,
)
from distillspec.decoding.kv_cache import TreeCall
from distillspec.decoding.requests import RowUpdate, _Row
from distillspec.decoding.sampled_tree import sampled_tree_outcome
from distillspec.decoding.sampling import (
    greedy_tokens,
    pad_vocab,
    sample_without_replacement,
    warp_rows,
)
from distillspec.decoding.strategy import Models, pending_tokens
from distillspec.decoding.tree import DynamicTree
from distillspec.decoding.tree_step import (
    TreeBlock,
    check_tree_attention,
    finish_tree_block,
    last_tree_position,
    sampled_rows,
)


class _Candidates(NamedTuple):
    """A block's candidates per row, in proposal order: ``[B, C]`` each (``lineage [B, C, D]``),
    ``fed [B, F]``: the candidates written to the draft's cache, in slot order, and the sampled
    rows' q after the root and after each fed node, ``[S, 1 + F, V]`` (None: no sampled row)."""

    tokens: torch.Tensor
    scores: torch.Tensor
    parents: torch.Tensor
    lineage: torch.Tensor
    fed: torch.Tensor
    draft_probs: torch.Tensor | None


class DynamicTreeStep:
    """One dynamic tree block for every row, greedy and sampled (``Strategy``)."""

    def __init__(self, models: Models, tree: DynamicTree):
        check_tree_attention(models)
        self.models, self.tree = models, tree
        self.last_position = last_tree_position(models)
        k, device = tree.top_k, models.device
        # Candidate depths and ranks among siblings, in proposal order (the same for every row).
        depths = [1] * k + [d for d in range(2, tree.depth + 1) for _ in range(k * k)]
        self.depths = torch.tensor(depths, device=device)
        self.ranks = torch.arange(k, device=device).repeat(1 + (tree.depth - 1) * k)
        self.prior = prior_plan(tree.nodes, tree.depth, k)
        prior_tree, chosen = self.prior.tree, self.prior.chosen.tolist()
        fed = [c for picked in self.prior.picks for c in picked.tolist()]
        # The prior tree's view of a sampled row's block: its nodes' columns among the chosen
        # nodes, and the fed slot whose q each internal node's children were drawn from.
        self.prior_columns = torch.tensor(self.prior.order, device=device)
        internal = [fed.index(chosen[self.prior.order[n]]) for n in prior_tree.internal]
        self.prior_q = torch.tensor([0, *(1 + i for i in internal)], device=device)

    @property
    def lookahead(self) -> int:
        return self.tree.depth

    def step(self, rows: list[_Row], caps: list[int]) -> list[RowUpdate]:
        models = self.models
        sampled = sampled_rows(models, rows, caps, self.tree.candidates + self.tree.nodes + 1)
        candidates, draft_start, calls = models.measure("draft", self._draft, rows, sampled)
        chosen = select_nodes(candidates.scores, self.depths.unsqueeze(0), self.tree.nodes)
        if sampled is not None:
            chosen[sampled.index] = self.prior.chosen.to(chosen.device)
        target_start, logits, outcome = models.measure(
            "target", self._verify, rows, candidates, chosen, caps, sampled)
        fed = torch.nn.functional.pad(candidates.fed, (0, 1), value=-1)  # a column if none fed
        on_fed = chosen.unsqueeze(2) == fed.unsqueeze(1)  # [B, N, F + 1]
        slots = torch.where(on_fed.any(dim=2), on_fed.to(torch.int8).argmax(dim=2), -1)
        block = TreeBlock(candidates.tokens.gather(1, chosen), slots, outcome, calls)
        return finish_tree_block(models, rows, caps, block, logits, (target_start, draft_start))

    def _draft(self, rows: list[_Row], sampled) -> tuple[_Candidates, int, int]:
        """Grow every row's candidates: the draft reads the pending tokens, then ``D - 1``
        times feeds ``K`` candidates of the newest level (a greedy row: the most probable; a
        sampled row: the prior plan's), each seeing its ancestors among the nodes fed, and
        proposes ``K`` children of each. Returns the candidates, the first draft slot holding a
        node and the call count."""
        tree, draft, device = self.tree, self.models.draft, self.models.device
        k, batch = tree.top_k, len(rows)
        draft.make_room(max(len(row.draft_pending) for row in rows) + (tree.depth - 1) * k)
        tokens, pads = pending_tokens(rows, device)
        logits = draft.forward(tokens, pads, logits_to_keep=1)[:, -1:]
        root = torch.zeros(batch, 1, dtype=torch.float64, device=device)
        probs: list[torch.Tensor] = []
        first_tokens, first_scores = self._children(logits, root, sampled, 0, probs)
        token_parts, score_parts = [first_tokens], [first_scores]
        parents = [torch.full((batch, k), -1, dtype=torch.long, device=device)]
        lineage = extend_lineage(None, parents[0], 0, 1, tree.depth)
        start, fed, level_start = draft.length, [], 0
        for depth in range(1, tree.depth):
            local = torch.topk(score_parts[-1], k, dim=1).indices  # within the newest level
            if sampled is not None:
                local[sampled.index] = self.prior.picks[depth - 1].to(device) - level_start
            picked = local + level_start  # [B, K] candidate indices
            fed_index = torch.cat([*fed, picked], dim=1)
            visible = sees(lineage, picked, fed_index, self.depths[fed_index])
            offsets = torch.full((batch, k), depth - 1, dtype=torch.long, device=device)
            call = TreeCall(start, offsets, visible, self.last_position)
            logits = draft.forward(token_parts[-1].gather(1, local), tree=call, logits_to_keep=k)
            level_start += score_parts[-1].shape[1]
            new_tokens, new_scores = self._children(
                logits, score_parts[-1].gather(1, local), sampled, level_start, probs)
            token_parts.append(new_tokens)
            score_parts.append(new_scores)
            parents.append(picked.repeat_interleave(k, dim=1))
            lineage = extend_lineage(lineage, parents[-1], level_start, depth + 1, tree.depth)
            fed.append(picked)
        fed_all = torch.cat(fed, dim=1) if fed else root.new_zeros(batch, 0, dtype=torch.long)
        candidates = _Candidates(torch.cat(token_parts, dim=1), torch.cat(score_parts, dim=1),
                                 torch.cat(parents, dim=1), lineage, fed_all,
                                 torch.cat(probs, dim=1) if probs else None)
        return candidates, start, tree.depth

    def _children(self, logits, parent_scores, sampled, first: int, probs: list):
        """The children of P parents from the draft's logits after each ``[B, P, V]``: the
        top-K with their scores (``top_children``); a sampled row's tokens are replaced by K
        draws without replacement of its warped q after each parent (uniforms from ``first``
        on), and that q is appended to ``probs``: the distribution the draws came from."""
        tokens, scores = top_children(logits, parent_scores, self.tree.top_k,
                                      self.models.draft.kept_ids)
        if sampled is None:
            return tokens, scores
        k, parent_count = self.tree.top_k, logits.shape[1]
        q = warp_rows(pad_vocab(logits[sampled.index], self.models.vocab), sampled.samplings)
        probs.append(q)
        draws = sampled.uniforms[:, first : first + parent_count * k].reshape(-1, parent_count, k)
        samples = sample_without_replacement(q, draws)
        tokens[sampled.index] = samples.flatten(1)
        return tokens, scores

    def _verify(self, rows: list[_Row], candidates: _Candidates, chosen: torch.Tensor,
                caps: list[int], sampled):
        """One target pass over ``[pending, chosen nodes]`` per row (node n at its depth past the
        pending token, seeing its ancestors), then each row's rule; returns the first slot
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
        alpha = self._greedy_alpha(parents, self.ranks[chosen], path, count, max_accepted)
        outcome = (path, count, next_tokens, *alpha)
        if sampled is not None:  # the per-row mode mask: sampled rows replace their results
            self._verify_sampled(sampled, node_tokens, logits, candidates.draft_probs,
                                 max_accepted, outcome)
        return start, logits, outcome

    def _verify_sampled(self, sampled, node_tokens, logits, draft_probs, max_accepted, outcome):
        """The multi-draft rule for the sampled rows on the prior plan's static tree (its nodes
        are the rows' chosen columns in ``prior.order``); their results replace the greedy
        rule's."""
        models, tree, prior = self.models, self.tree, self.prior
        index, columns = sampled.index, self.prior_columns
        target_columns = torch.cat([columns.new_zeros(1), columns + 1])
        uniforms = sampled.uniforms[:, tree.candidates :]
        path, count, next_tokens, *stats = sampled_tree_outcome(
            prior.tree, node_tokens[index][:, columns], draft_probs[:, self.prior_q],
            logits[index][:, target_columns], sampled.samplings, vocab=models.vocab,
            max_accepted=max_accepted[index], lenience=models.speculation.lenience,
            epsilon=models.speculation.epsilon,
            uniforms=(uniforms[:, : tree.nodes], uniforms[:, -1]),
            compiled=models.target.compiled)
        path = torch.where(path >= 0, columns[path.clamp_min(0)], -1)  # tree node -> column
        path = torch.nn.functional.pad(path, (0, tree.depth - path.shape[1]), value=-1)
        for whole, part in zip(outcome, (path, count, next_tokens, *stats)):
            whole[index] = part.to(whole.dtype)

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

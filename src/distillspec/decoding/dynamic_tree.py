"""Dynamic draft trees (EAGLE-2), pure parts: grow candidates by path probability, choose the
nodes to verify, and the greedy rule on a tree of its own per row.

Candidates are numbered in the order they are proposed, level by level: ``top_k`` children of
the root, then ``top_k ** 2`` per later level (``top_k`` children of each of the ``top_k``
expanded nodes). A candidate's *score* is the log of its path probability under the draft,
``sum_i log q(x_i | x_<i)``; a node's score is at most its parent's. ``lineage [B, C, D]`` holds
each candidate's ancestor at every depth (itself at its own depth, -1 below it), so "j is an
ancestor of i or i itself" is ``lineage[i, depth(j) - 1] == j``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from distillspec.decoding.sampling import full_ids, kept_columns, kept_for_top
from distillspec.decoding.tree import RANK_PROFILE, Tree

# Log-probabilities are floored here: a pruned head's -inf logits would give -inf scores whose
# ties could choose a node without its parent; 1e4 nats below the top is probability 0 anyway.
LOGPROB_FLOOR = -1.0e4
# Scores are float64 and a deeper node loses this much more, so a node never ties its parent.
DEPTH_TIE_BREAK = 1.0e-9


def top_children(draft_logits: torch.Tensor, parent_scores: torch.Tensor, top_k: int,
                 kept_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` most likely draft tokens after each of P parents and their scores.

    ``draft_logits [B, P, V]``, ``parent_scores [B, P]`` (float64) -> ``tokens [B, P * top_k]``
    and ``scores = parent_score + log q(token | parent)`` in the same order (parent-major, then
    rank), float64. ``kept_ids``: the only ids with finite logits (a pruned head), so the
    log-softmax and the top-k run over those columns (``sampling.kept_columns``) when there
    are at least ``top_k`` of them."""
    kept_ids = kept_for_top(kept_ids, top_k)
    logits = kept_columns(draft_logits, kept_ids)
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp_min(LOGPROB_FLOOR)
    top = torch.topk(logprobs, top_k, dim=-1)
    scores = parent_scores.unsqueeze(-1) + top.values.double()
    return full_ids(top.indices, kept_ids).flatten(1), scores.flatten(1)


def extend_lineage(lineage: torch.Tensor | None, parents: torch.Tensor, first: int,
                   depth: int, max_depth: int) -> torch.Tensor:
    """``lineage [B, C, max_depth]`` with the candidates ``first ..`` (one level, at ``depth``,
    their parents ``parents [B, P]``, -1: the root) appended."""
    batch, count = parents.shape
    new = torch.full((batch, count, max_depth), -1, dtype=torch.long, device=parents.device)
    if lineage is not None and depth > 1:
        index = parents.clamp_min(0).unsqueeze(-1).expand(-1, -1, max_depth)
        new = lineage.gather(1, index).clone()
    new[:, :, depth - 1] = torch.arange(first, first + count, device=parents.device)
    return new if lineage is None else torch.cat([lineage, new], dim=1)


def sees(lineage: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
         key_depths: torch.Tensor) -> torch.Tensor:
    """``[B, Q, K]`` bool: key candidate ``keys[b, k]`` (at depth ``key_depths[b, k]``) is
    query candidate ``queries[b, q]`` or one of its ancestors."""
    depth_count = lineage.shape[2]
    query_lineage = lineage.gather(1, queries.unsqueeze(-1).expand(-1, -1, depth_count))
    at_key_depth = query_lineage.gather(
        2, (key_depths - 1).unsqueeze(1).expand(-1, queries.shape[1], -1))
    return at_key_depth == keys.unsqueeze(1)


def select_nodes(scores: torch.Tensor, depths: torch.Tensor, nodes: int) -> torch.Tensor:
    """The ``nodes`` candidates of highest score per row, ``[B, nodes]`` in candidate order
    (so by depth: a parent before its children). With the depth tie-break a chosen node's
    parent always scores higher, so the choice holds every chosen node's ancestors."""
    ranked = scores - DEPTH_TIE_BREAK * depths.double()
    chosen = torch.topk(ranked, nodes, dim=1).indices
    return chosen.sort(dim=1).values


def node_parents(chosen: torch.Tensor, candidate_parents: torch.Tensor) -> torch.Tensor:
    """Each chosen node's parent as a node index (its position in ``chosen``), -1: the root."""
    batch, count = candidate_parents.shape
    position = torch.full((batch, count), -1, dtype=torch.long, device=chosen.device)
    position.scatter_(1, chosen, torch.arange(chosen.shape[1], device=chosen.device).expand_as(chosen))
    parents = candidate_parents.gather(1, chosen)
    return torch.where(parents >= 0, position.gather(1, parents.clamp_min(0)), -1)


def accept_rows_greedy(
    parents: torch.Tensor,
    node_tokens: torch.Tensor,
    target_tokens: torch.Tensor,
    depth: int,
    max_accepted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The greedy tree rule when every row has a tree of its own.

    ``parents [B, N]`` (node index, -1 = the root), ``node_tokens [B, N]`` (siblings distinct),
    ``target_tokens [B, N + 1]`` (the target's argmax after the root, column 0, and after each
    node, column n + 1). From the root, move to the child whose token is the target's argmax
    after the current node, while one exists and fewer than ``max_accepted[b]`` are accepted.
    Returns ``(path [B, depth], num_accepted [B], next_tokens [B])`` as
    ``tree.accept_tree_greedy`` does."""
    batch = node_tokens.shape[0]
    rows = torch.arange(batch, device=node_tokens.device)
    current = torch.zeros(batch, dtype=torch.long, device=node_tokens.device)  # 0 = the root
    going = max_accepted > 0
    path = torch.full((batch, depth), -1, dtype=torch.long, device=node_tokens.device)
    num_accepted = torch.zeros_like(current)
    for level in range(depth):
        wanted = target_tokens[rows, current]
        match = (parents + 1 == current.unsqueeze(1)) & (node_tokens == wanted.unsqueeze(1))
        match &= going.unsqueeze(1)
        found = match.any(dim=1)
        chosen = match.to(torch.int8).argmax(dim=1)
        path[:, level] = torch.where(found, chosen, -1)
        current = torch.where(found, chosen + 1, current)
        num_accepted += found.long()
        going = found & (num_accepted < max_accepted)
    return path, num_accepted, target_tokens[rows, current]


class PriorPlan(NamedTuple):
    """The candidates a sampled row feeds and verifies, fixed in advance: ``picks[l]`` the
    ``K`` candidates fed at draft call ``l + 2``, ``chosen [N]`` those verified (candidate
    order), and ``tree``, the same nodes as a static ``Tree`` (rank r = the r-th draw)
    with ``order[n]`` = the position in ``chosen`` of the tree's node n."""

    picks: list[torch.Tensor]
    chosen: torch.Tensor
    tree: Tree
    order: tuple[int, ...]


def prior_plan(nodes: int, depth: int, top_k: int,
               profile: Sequence[float] = RANK_PROFILE) -> PriorPlan:
    """A dynamic tree's layout for sampled rows: grown as for greedy rows, but scored by the
    rank profile instead of the row's draft probabilities. A sampled row's children are draws of
    q without replacement; choosing among them by their q would bias them (the rule needs
    unselected draws), choosing by index does not. The profile is made strictly decreasing, so
    every node's children are its first draws (the rule removes exactly the siblings it tested
    before). The result is a static tree that fits the dynamic layout (``K`` fed nodes per call,
    ``K`` children each), so its rows share the block."""
    weights = sorted([max(p, 1e-12) for p in profile[:top_k]], reverse=True)
    weights += [1e-12] * max(0, top_k - len(weights))
    rank_scores = torch.tensor([math.log(w) - DEPTH_TIE_BREAK * r for r, w in enumerate(weights)],
                               dtype=torch.float64)
    scores, parents, ranks = [rank_scores], [[-1] * top_k], list(range(top_k))
    picks, newest = [], 0
    for _ in range(1, depth):
        picked = torch.topk(scores[-1], top_k).indices + newest
        flat = torch.cat(scores)
        newest = flat.shape[0]
        scores.append((flat[picked].unsqueeze(1) + rank_scores).flatten())
        parents.append(picked.repeat_interleave(top_k).tolist())
        ranks += list(range(top_k)) * top_k
        picks.append(picked)
    parent_of = [p for level in parents for p in level]
    depths = torch.tensor([1] * top_k + [d for d in range(2, depth + 1) for _ in range(top_k**2)])
    chosen = select_nodes(torch.cat(scores).unsqueeze(0), depths.unsqueeze(0), nodes)[0]

    def path(candidate: int) -> tuple[int, ...]:
        parent = parent_of[candidate]
        return (path(parent) if parent >= 0 else ()) + (ranks[candidate],)

    paths = [path(int(c)) for c in chosen]
    tree = Tree(tuple(paths))
    for siblings in tree.child_table:
        sibling_ranks = [tree.rank[n] for n in siblings if n >= 0]
        if sibling_ranks != list(range(len(sibling_ranks))):  # the decreasing scores ensure it
            raise RuntimeError(f"prior_plan chose children {sibling_ranks}, not first draws")
    return PriorPlan(picks, chosen, tree, tuple(paths.index(p) for p in tree.paths))

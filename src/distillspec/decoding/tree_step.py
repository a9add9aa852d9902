"""The tree strategy (``--tree``): several draft tokens per position, verified in one target pass.

The draft reads each row's pending tokens, then the tree's internal nodes one level per call;
the target scores ``[pending, all nodes]`` once (each node sees its ancestors only). Each row
takes its own mode in the same block (a per-row greedy mask, as vLLM's rejection sampler): a
greedy row's nodes are the draft's top-k and its rule exact argmax matching
(``tree.accept_tree_greedy``), a sampled row's nodes are draws without replacement from its
warped q and its rule SpecInfer's multi-step speculative sampling in that form
(``acceptance.verify_tree``). Each row keeps its accepted path in both caches
(``CachedModel.keep_slots``). The tree is static: its masks are built once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from distillspec.decoding.kv_cache import TreeCall, takes_4d_mask
from distillspec.decoding.logprobs import host_logprobs
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.requests import RowUpdate, _Row
from distillspec.decoding.sampled_tree import sampled_tree_outcome
from distillspec.decoding.sampling import greedy_tokens, pad_vocab, warp_rows
from distillspec.decoding.strategy import Models, first, pending_tokens
from distillspec.decoding.tree import Tree, accept_tree_greedy, tree_node_samples, tree_node_tokens


class _SampledRows(NamedTuple):
    """The sampled rows of a tree block: their indices ``[S]``, configs and uniforms, and
    whether they are all the rows (then nothing greedy is computed)."""

    index: torch.Tensor
    samplings: list[SamplingConfig]
    uniforms: torch.Tensor  # [S, width]: node draws, acceptance draws, the final draw
    every_row: bool


def check_tree_attention(models: Models) -> None:
    """Trees need a 4-D mask (each node sees its ancestors only): sdpa or eager attention in
    both models. Checked when a tree strategy is made, not halfway through a block."""
    for model in (models.target.model, models.draft.model):
        if not takes_4d_mask(model):
            raise ValueError(
                f"Tree drafting needs sdpa or eager attention (a 4-D mask); "
                f"{type(model).__name__} uses {model.config._attn_implementation!r}. Decode "
                "without --tree."
            )


def last_tree_position(models: Models) -> int | None:
    """Where tree nodes' positions are clamped. A row near the end of the context still writes
    every node; one past the last position can never be accepted (the row's budget stops it
    first), so it sits at the last one."""
    return models.context - 1 if models.context else None


def sampled_rows(models: Models, rows: list[_Row], caps: list[int],
                 width: int) -> _SampledRows | None:
    """The rows that sample (None: all greedy), with ``width`` uniforms each (a static tree:
    ``2N + 1``, node draws, acceptance draws, the final draw). A seeded row takes them from its
    own generator (1 number when its cap is 0, like a chain block with nothing to draft), so
    what it consumes depends on its own state only."""
    chosen = [i for i, row in enumerate(rows) if not row.request.sampling.greedy]
    if not chosen:
        return None
    device = models.device
    uniforms = torch.rand(len(chosen), width, generator=models.generator, device=device)
    for slot, index in enumerate(chosen):
        generator = rows[index].generator
        if generator is None:
            continue
        own = torch.rand(width if caps[index] > 0 else 1, generator=generator, device=device)
        uniforms[slot, -own.shape[0]:] = own
    samplings = [rows[i].request.sampling for i in chosen]
    return _SampledRows(torch.tensor(chosen, device=device), samplings, uniforms,
                        len(chosen) == len(rows))


class TreeStep:
    """One tree block for every row, greedy and sampled rows alike (``Strategy``)."""

    def __init__(self, models: Models, tree: Tree):
        check_tree_attention(models)
        self.models, self.tree, device = models, tree, models.device
        self.last_position = last_tree_position(models)
        self.levels = self._plan()
        self.verify_mask = tree.ancestors([-1, *range(tree.size)]).to(device)
        top1 = [rank == 0 for rank in tree.rank]
        self.rank0 = torch.tensor([*top1, False], device=device)  # [-1]: none
        parents = [n in tree.top1_parents for n in range(-1, tree.size)]
        self.top1_parent = torch.tensor(parents, device=device)  # by input column

    @property
    def lookahead(self) -> int:
        return self.tree.depth

    def step(self, rows: list[_Row], caps: list[int]) -> list[RowUpdate]:
        models = self.models
        sampled = sampled_rows(models, rows, caps, 2 * self.tree.size + 1)
        node_tokens, draft_probs, draft_start, fed, calls = models.measure(
            "draft", self._draft, rows, sampled)
        target_start, logits, outcome = models.measure(
            "target", self._verify, rows, node_tokens, draft_probs, caps, sampled)
        slots = torch.full((self.tree.size,), -1, dtype=torch.long, device=models.device)
        slots[torch.tensor(fed, dtype=torch.long, device=models.device)] = torch.arange(
            len(fed), device=models.device)
        block = TreeBlock(node_tokens, slots.expand(len(rows), -1), outcome, calls)
        return finish_tree_block(models, rows, caps, block, logits, (target_start, draft_start))

    def _draft(self, rows: list[_Row], sampled: _SampledRows | None):
        """The tree's node tokens ``[B, N]``: the draft reads each row's pending tokens, then the
        internal nodes one level per call (each sees its ancestors only). Returns the tokens,
        the sampled rows' q ``[S, 1 + len(internal), V]`` (None: no sampled row), the first
        draft slot holding a node, the nodes fed (in slot order) and the call count."""
        tree, draft, device = self.tree, self.models.draft, self.models.device
        draft.make_room(max(len(row.draft_pending) for row in rows) + len(tree.internal))
        tokens, pads = pending_tokens(rows, device)
        logits = draft.forward(tokens, pads, logits_to_keep=1)[:, -1:]
        node_tokens = torch.zeros(len(rows), tree.size, dtype=torch.long, device=device)
        draft_probs: list[torch.Tensor] = []
        self._children(logits, (-1,), node_tokens, sampled, draft_probs)
        start, fed = draft.length, []
        for level, offsets, visible in self.levels:
            call = TreeCall(start, offsets, visible, self.last_position)
            logits = draft.forward(node_tokens[:, level], tree=call, logits_to_keep=len(level))
            self._children(logits, level, node_tokens, sampled, draft_probs)
            fed += level
        probs = torch.stack(draft_probs, dim=1) if draft_probs else None
        return node_tokens, probs, start, fed, 1 + len(self.levels)

    def _children(self, logits, parents, node_tokens, sampled, draft_probs: list) -> None:
        """Fill the children of ``parents`` from the draft's logits after each ``[B, P, V]``:
        the top-k tokens for greedy rows (``tree_node_tokens``), draws without replacement from
        the warped q for sampled rows (``tree_node_samples``), whose q is appended to
        ``draft_probs``: the distribution the draws came from, which the rule divides by."""
        if sampled is None or not sampled.every_row:
            kept = self.models.draft.kept_ids
            for column, parent in enumerate(parents):
                tree_node_tokens(self.tree, logits[:, column], parent, node_tokens, kept)
        if sampled is None:
            return
        own = logits if sampled.every_row else logits[sampled.index]  # no copy when all sample
        probs = warp_rows(pad_vocab(own, self.models.vocab), sampled.samplings)
        draws = sampled.uniforms[:, : self.tree.size]
        for column, parent in enumerate(parents):
            draft_probs.append(probs[:, column])
            children, tokens = tree_node_samples(self.tree, probs[:, column], parent, draws)
            if children:
                where = torch.tensor(children, device=self.models.device)
                node_tokens[sampled.index.unsqueeze(1), where.unsqueeze(0)] = tokens

    def _plan(self) -> list[tuple[list[int], tuple[int, ...], torch.Tensor]]:
        """Per draft call after the first: the internal nodes of one level, their position
        offsets and what each sees among the nodes fed so far (its ancestors and itself)."""
        tree, plan, fed = self.tree, [], []
        for depth in range(1, tree.depth):
            level = [n for n in tree.level(depth) if n in tree.internal]
            visible = tree.ancestors(fed + level)[len(fed):].to(self.models.device)
            plan.append((level, (depth - 1,) * len(level), visible))
            fed += level
        return plan

    def _verify(self, rows: list[_Row], node_tokens, draft_probs, caps, sampled):
        """One target pass over ``[pending, nodes]`` (node n at depth(n) past the pending token,
        seeing its ancestors), then each row's rule; returns the first slot written (after any
        compaction), the logits and ``(path, num_accepted, next_tokens, alpha_sum, levels)``."""
        tree, models = self.tree, self.models
        models.target.make_room(tree.size + 1)
        start = models.target.length
        pending = torch.tensor([[row.target_pending] for row in rows], device=models.device)
        call = TreeCall(start, (0, *tree.depths), self.verify_mask, self.last_position)
        logits = models.target.forward(torch.cat([pending, node_tokens], dim=1), tree=call)
        max_accepted = torch.tensor(caps, device=models.device)
        if sampled is not None and sampled.every_row:
            return start, logits, self._sampled(node_tokens, draft_probs, logits, max_accepted,
                                                sampled)
        path, count, next_tokens = accept_tree_greedy(tree, node_tokens, greedy_tokens(logits),
                                                      max_accepted)
        outcome = (path, count, next_tokens, *self._greedy_alpha(path, count, max_accepted))
        if sampled is not None:  # the per-row mode mask: sampled rows replace their results
            index = sampled.index
            parts = self._sampled(node_tokens[index], draft_probs, logits[index],
                                  max_accepted[index], sampled)
            for whole, part in zip(outcome, parts):
                whole[index] = part.to(whole.dtype)
        return start, logits, outcome

    def _sampled(self, node_tokens, draft_probs, logits, max_accepted, sampled):
        """The sampled rows' rule (``verify_tree``) and analytic alpha, on their own
        ``node_tokens``, target ``logits`` and caps: ``(path, num_accepted, next_tokens,
        alpha_sum, levels)``, typed as the greedy rows' outcome."""
        models, size = self.models, self.tree.size
        return sampled_tree_outcome(
            self.tree, node_tokens, draft_probs, logits, sampled.samplings, vocab=models.vocab,
            max_accepted=max_accepted, lenience=models.speculation.lenience,
            epsilon=models.speculation.epsilon,
            uniforms=(sampled.uniforms[:, size : 2 * size], sampled.uniforms[:, -1]),
            compiled=models.target.compiled)

    def _greedy_alpha(self, path, count, max_accepted):
        """Greedy rows' alpha: accepted nodes that were the draft's top-1 token, over the levels
        verified where the top-1 token was proposed (after a node without a rank-0 child the
        next level is not a miss); ``[B]`` each."""
        top1 = (self.rank0[path] & (path >= 0)).sum(dim=1)
        last = path.gather(1, (count - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
        last = torch.where(count > 0, last, -1)
        proposed = self.top1_parent[last + 1]
        return top1.double(), count + ((count < max_accepted) & proposed).long()


class TreeBlock(NamedTuple):
    """A verified tree block, per row: ``node_tokens [B, N]``, ``node_slots [B, N]`` (the draft
    slot holding each node from the block's first, -1: not fed to the draft), ``outcome``
    ``(path [B, depth], num_accepted, next_tokens, alpha_sum, levels)`` and the draft calls."""

    node_tokens: torch.Tensor
    node_slots: torch.Tensor
    outcome: tuple[torch.Tensor, ...]
    calls: int


def finish_tree_block(models: Models, rows: list[_Row], caps: list[int], block: TreeBlock,
                      logits: torch.Tensor, starts: tuple[int, int]) -> list[RowUpdate]:
    """Emit each row's accepted path and next token, keep the path in both caches (the target's
    slots from ``starts[0]``, the draft's from ``starts[1]``) and count the block."""
    models.metrics.draft_forward_passes += block.calls
    models.metrics.target_forward_passes += 1
    path, accepted, next_tokens, alpha, compared = block.outcome
    columns = [block.node_tokens, block.node_slots, path, accepted.unsqueeze(1),
               next_tokens.unsqueeze(1), alpha.unsqueeze(1), compared.unsqueeze(1)]
    packed = torch.cat([c.double() for c in columns], dim=1).tolist()  # one transfer
    size, depth = block.node_tokens.shape[1], path.shape[1]
    target_kept, draft_kept, taken, updates = [], [], [], []
    for row, cap, values in zip(rows, caps, packed):
        nodes, slots = [int(t) for t in values[:size]], values[size : 2 * size]
        count = int(values[2 * size + depth])
        on_path = [int(n) for n in values[2 * size : 2 * size + count]]
        token, alpha_sum, levels = values[2 * size + depth + 1 :]
        token, drafted = int(token), [nodes[n] for n in on_path]
        target_kept.append([0] + [n + 1 for n in on_path])
        draft_kept.append([int(slots[n]) for n in on_path if slots[n] >= 0])
        row.target_pending = token
        last_fed = not on_path or slots[on_path[-1]] >= 0
        row.draft_pending = [token] if last_fed else [drafted[-1], token]
        row.counts.record_block(cap, len(on_path), alpha_sum, int(levels))
        row.counts.draft_calls += block.calls
        new = row.emit(drafted + [token])
        taken.append(drafted + [token])
        updates.append(RowUpdate(row.request.request_id, new, row.finish_reason is not None,
                                 row.finish_reason, cap, len(on_path)))
    _path_logprobs(models, rows, updates, logits, target_kept, taken)
    models.target.keep_slots(starts[0], target_kept)
    models.draft.keep_slots(starts[1], draft_kept)
    return updates


def _path_logprobs(models: Models, rows: list[_Row], updates, logits, kept, taken) -> None:
    """Log-probabilities of each row's path: the token after kept slot i is taken[i]."""
    tops = [row.request.logprobs for row in rows]
    if all(top is None for top in tops):
        return
    device, width = models.device, max(map(len, kept))
    index = torch.tensor([k + [0] * (width - len(k)) for k in kept], device=device)
    tokens = torch.tensor([t + [0] * (width - len(t)) for t in taken], device=device)
    batch = torch.arange(len(kept), device=device).unsqueeze(1)
    for update, entries in zip(updates, host_logprobs(logits[batch, index], tokens, tops)):
        update.logprobs = first(entries, len(update.new_tokens))

"""The step-level speculative decoding engine, and the batch generate functions built on it.

A ``Decoder`` holds a set of live rows (requests). ``add`` queues a request at any time;
``step`` admits queued requests (one batched prefill per model), runs one speculative block
for every live row and returns each row's new tokens; finished rows leave. One block:

1. each row's draft length is ``min(gamma, its remaining budget - 1)``; the draft samples the
   longest of them autoregressively (a row stops proposing early, with adaptive drafting, after
   a token the draft is unsure of): tokens x_1..x_g and the warped q_1..q_g they came from;
2. the target scores ``[pending, x_1..x_g]`` in one forward pass: p_1..p_{g+1};
3. ``acceptance.verify`` keeps a prefix of n tokens per row and samples one more token
   (residual after a rejection, bonus after a full acceptance);
4. both caches forget their rejected slots; a row that accepted all g tokens feeds x_g and the
   new token to the draft first in the next block;
5. tokens are emitted per row, cut at the first stop id and the budget (a row that asks for
   log-probabilities gets the target's, from step 2's logits: ``decoding/logprobs.py``); done
   rows leave.

Bookkeeping (budgets, pending tokens, outputs, counts) lives on the host; each block moves its
results to the host once. Every random number a row uses comes from its own generator when its
request has a seed (else from the decoder's), and its draft length depends only on its own state,
so a seeded or greedy row produces exactly what it would produce alone, whatever else is in the
batch. Plain decoding is the same block with no draft (g = 0).

With a tree (``--tree``) a block drafts several tokens per position instead and verifies them
in one target pass; each row takes its own mode in the same block (a per-row greedy mask, as
vLLM's rejection sampler): a greedy row's nodes are the draft's top-k and its rule exact argmax
matching (``tree.accept_tree_greedy``), a sampled row's nodes are i.i.d. draws from its warped q
and its rule SpecInfer's multi-step speculative sampling (``acceptance.verify_tree``). A
sampled row thus no longer changes a greedy row's path, and sampled decoding gets trees too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from distillspec.decoding.acceptance import (
    analytic_acceptance,
    tree_acceptance,
    verify,
    verify_greedy,
    verify_tree,
)
from distillspec.decoding.kv_cache import CachedModel, TreeCall, ensure_croppable, takes_4d_mask
from distillspec.decoding.logprobs import host_logprobs
from distillspec.decoding.metrics import DecodeCounts, GenerationMetrics
from distillspec.decoding.params import SamplingConfig, SpeculationConfig, check_seed
from distillspec.decoding.requests import Request, RowUpdate, _Row, context_length, output_width
from distillspec.decoding.sampling import greedy_tokens, pad_vocab, sample, warp_rows
from distillspec.decoding.timing import timed
from distillspec.decoding.tree import (
    Tree,
    accept_tree_greedy,
    tree_node_samples,
    tree_node_tokens,
)


def check_deterministic(target, draft=None) -> None:
    """Deterministic decoding needs float32 models: a greedy or seeded row then gives the same
    tokens whatever shares its batch and whatever gamma or tree verifies it (tested); in
    bf16/fp16 a verify call of another width rounds differently and near-tied logits flip."""
    for role, model in (("target", target), ("draft", draft)):
        dtype = None if model is None else next(model.parameters()).dtype
        if dtype is not None and dtype != torch.float32:
            raise ValueError(
                f"deterministic decoding needs float32 models, but the {role} is in {dtype}. "
                "Load it with dtype='float32' (load_model / load_pair), or pass "
                "deterministic=False to accept bf16's near-tie flips."
            )


class _SampledRows(NamedTuple):
    """The sampled rows of a tree block: their indices ``[S]``, configs and uniforms."""

    index: torch.Tensor
    samplings: list[SamplingConfig]
    uniforms: torch.Tensor  # [S, 2N + 1]: node draws, acceptance draws, the final draw


class Decoder:
    """A set of live rows decoded together, one speculative block per ``step()``."""

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None = None,
        speculation: SpeculationConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ):
        ensure_croppable(target)
        if draft is not None:
            ensure_croppable(draft)
        if deterministic:
            check_deterministic(target, draft)
        self.speculation = speculation or SpeculationConfig()
        self.device = target.device
        self.generator = generator
        models = [m for m in (target, draft) if m is not None]
        self.vocab = max(output_width(m) for m in models)
        self.context = min((c for c in map(context_length, models) if c), default=None)
        self.target = CachedModel(target)
        self.draft = CachedModel(draft) if draft is not None else None
        self.rows: list[_Row] = []
        self.queue: list[_Row] = []
        self.finished: list[_Row] = []
        self.metrics = GenerationMetrics(rows=[], finish_reasons=[])
        self.greedy = False  # every live row greedy: the chain's argmax fast path (per step)
        # Tree drafting: several draft tokens per position, verified in one target pass
        # (decoding/tree.py); greedy rows take the draft's top few, sampled rows draws from q.
        self.tree = Tree.parse(self.speculation.tree) if draft is not None else None
        # A row near the end of the context still writes every node; one past the last position
        # can never be accepted (the row's budget stops it first), so it sits at the last one.
        self._last_position = self.context - 1 if self.context else None
        if self.tree is not None:  # the tree is static: its masks are built once
            for model in models:  # fail now, not halfway through a block
                if not takes_4d_mask(model):
                    raise ValueError(
                        f"Tree drafting needs sdpa or eager attention (a 4-D mask); "
                        f"{type(model).__name__} uses "
                        f"{model.config._attn_implementation!r}. Decode without --tree."
                    )
            self._tree_levels = self._tree_plan(self.tree)
            self._tree_verify = self.tree.ancestors([-1, *range(self.tree.size)]).to(self.device)
            top1 = [rank == 0 for rank in self.tree.rank]
            self._tree_rank0 = torch.tensor([*top1, False], device=self.device)  # [-1]: none
            parents = [n in self.tree.top1_parents for n in range(-1, self.tree.size)]
            self._tree_top1_parent = torch.tensor(parents, device=self.device)  # by input column

    # -- requests ------------------------------------------------------------------------------

    def add(self, request: Request, *, generator: torch.Generator | None = None) -> None:
        """Queue a request; it joins the batch at the start of the next ``step``.

        ``generator``: carry on with an existing row's generator (a server re-admitting a row
        after a failed step) instead of one seeded from ``request.seed``."""
        self.check_request(request)
        if generator is None and request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        gamma = self.speculation.gamma if self.draft is not None else 0
        if self.tree is not None:  # a tree block drafts up to the tree's depth
            gamma = max(gamma, self.tree.depth)
        counts = DecodeCounts(gamma=min(gamma, request.max_new_tokens))
        self.queue.append(_Row(request, counts, generator))

    def check_request(self, request: Request) -> None:
        """Refuse impossible requests before anything is allocated for them."""
        check_seed(request.seed, "Request.seed")
        budget = request.max_new_tokens
        scoring = request.prompt_logprobs is not None  # a budget of 0 only scores the prompt
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1 - scoring:
            raise ValueError(f"max_new_tokens must be an integer >= 1 (0 with prompt_logprobs), "
                             f"got {budget!r}.")
        for name in ("logprobs", "prompt_logprobs"):
            top = getattr(request, name)
            if top is not None and (isinstance(top, bool) or not isinstance(top, int)
                                    or not 0 <= top <= self.vocab):
                raise ValueError(f"{name} must be None or an integer in [0, {self.vocab}], "
                                 f"got {top!r}.")
        if not request.prompt_ids:
            raise ValueError("Empty prompt: every row needs at least one token.")
        length = len(request.prompt_ids)
        if self.context is not None:
            if length > self.context or (length == self.context and budget > 0):
                raise ValueError(
                    f"Prompt of {length} tokens is longer than the context of the model "
                    f"({self.context} positions). Shorten the prompt."
                )
            if length + budget > self.context:
                raise ValueError(
                    f"Prompt ({length} tokens) + max_new_tokens ({budget}) exceeds the "
                    f"context ({self.context} positions). Use max_new_tokens <= "
                    f"{self.context - length}."
                )
        if max(request.prompt_ids) >= self.vocab or min(request.prompt_ids) < 0:
            raise ValueError(
                f"Prompt token ids must be in [0, {self.vocab}) for this model; got "
                f"{min(request.prompt_ids)}..{max(request.prompt_ids)}."
            )

    def cancel(self, request_id: Any) -> None:
        """Stop a request (e.g. its client went away); it leaves at the next step."""
        for row in self.rows + self.queue:
            if row.request.request_id == request_id and row.finish_reason is None:
                row.finish_reason = "cancelled"

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.queue)

    # -- one block -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RowUpdate]:
        """Admit queued requests, run one block for all live rows, return what each emitted."""
        updates = self._admit() + self._leave(report=True)
        if not self.rows:
            return updates
        self.greedy = all(row.request.sampling.greedy for row in self.rows)
        if self.tree is not None and self.draft is not None:  # greedy and sampled rows alike
            caps = [min(self.tree.depth, row.remaining - 1) for row in self.rows]
            if max(caps) > 0:
                return updates + self._tree_step(caps)
        gamma_max = self.speculation.gamma if self.draft is not None else 0
        caps = [min(gamma_max, row.remaining - 1) for row in self.rows]
        planned = max(caps)
        uniforms = (
            torch.zeros(len(self.rows), 2 * planned + 1, device=self.device)
            if self.greedy
            else self._uniforms(caps, planned)
        )
        draft_time, (draft_tokens, draft_probs, lengths) = timed(
            self._draft_block, caps, uniforms[:, :planned], device=self.device
        )
        gamma = draft_tokens.shape[1]  # adaptive drafting may stop before `planned`
        accept_uniforms = uniforms[:, planned : planned + gamma]
        target_time, (outcome, alpha, logits) = timed(
            self._verify_block,
            draft_tokens,
            draft_probs,
            lengths,
            (accept_uniforms, uniforms[:, -1]),
            device=self.device,
        )
        self.metrics.draft_time_s += draft_time
        self.metrics.target_time_s += target_time
        self.metrics.draft_forward_passes += gamma
        self.metrics.target_forward_passes += 1
        host = self._to_host(draft_tokens, lengths, outcome, alpha)
        logprobs = self._chain_logprobs(logits, draft_tokens, outcome)
        self._rollback(host, gamma)
        for index, (row, (drafted, length, accepted, token, alpha_sum)) in enumerate(
                zip(self.rows, host)):
            row.target_pending = token
            if self.draft is not None:
                row.draft_pending = [drafted[-1], token] if accepted == gamma > 0 else [token]
                row.counts.record_block(length, accepted, alpha_sum, min(accepted + 1, length))
                row.counts.draft_calls += gamma
            else:
                row.counts.target_calls += 1
            new = row.emit(drafted[:accepted] + [token])
            done = row.finish_reason is not None
            updates.append(RowUpdate(row.request.request_id, new, done, row.finish_reason,
                                     length if self.draft is not None else 0, accepted,
                                     _first(logprobs[index], len(new))))
        return updates + self._leave()

    def _tree_step(self, caps: list[int]) -> list[RowUpdate]:
        """One tree block for every row, each with its own rule: greedy rows take the draft's
        top-k nodes and the greedy rule, sampled rows i.i.d. draws from q and the multi-draft
        rule (``acceptance.verify_tree``); one draft pass per level and one target pass for all.
        Each row keeps its accepted path in both caches (``kv_cache.keep_slots``)."""
        sampled = self._sampled_rows(caps)
        draft_time, (node_tokens, draft_probs, draft_start, fed, calls) = timed(
            self._draft_tree, sampled, device=self.device)
        target_time, (target_start, logits, outcome) = timed(
            self._verify_tree, node_tokens, draft_probs, caps, sampled, device=self.device)
        self.metrics.draft_time_s += draft_time
        self.metrics.target_time_s += target_time
        self.metrics.draft_forward_passes += calls
        self.metrics.target_forward_passes += 1
        path, accepted, next_tokens, alpha, compared = outcome
        columns = [node_tokens, path, accepted.unsqueeze(1), next_tokens.unsqueeze(1),
                   alpha.unsqueeze(1), compared.unsqueeze(1)]
        packed = torch.cat([c.double() for c in columns], dim=1).tolist()  # one transfer
        fed_slot = {node: i for i, node in enumerate(fed)}
        target_kept, draft_kept, taken, updates = [], [], [], []
        for row, cap, values in zip(self.rows, caps, packed):
            nodes, on_path, token, alpha_sum, levels = self._unpack_tree(values)
            drafted = [nodes[n] for n in on_path]
            target_kept.append([0] + [n + 1 for n in on_path])
            draft_kept.append([fed_slot[n] for n in on_path if n in fed_slot])
            row.target_pending = token
            last_fed = not on_path or on_path[-1] in fed_slot
            row.draft_pending = [token] if last_fed else [drafted[-1], token]
            row.counts.record_block(cap, len(on_path), alpha_sum, levels)
            row.counts.draft_calls += calls
            new = row.emit(drafted + [token])
            taken.append(drafted + [token])
            done = row.finish_reason is not None
            updates.append(RowUpdate(row.request.request_id, new, done, row.finish_reason,
                                     cap, len(on_path)))
        self._tree_logprobs(updates, logits, target_kept, taken)
        self.target.keep_slots(target_start, target_kept)
        self.draft.keep_slots(draft_start, draft_kept)
        return updates + self._leave()

    def _unpack_tree(self, values: list[float]):
        """One row of a tree block's packed results: its node tokens, accepted nodes, next
        token, alpha sum and the number of levels alpha was measured at."""
        size, depth = self.tree.size, self.tree.depth
        count = int(values[size + depth])
        nodes = [int(t) for t in values[:size]]
        on_path = [int(n) for n in values[size : size + count]]
        token, alpha_sum, levels = values[size + depth + 1 :]
        return nodes, on_path, int(token), alpha_sum, int(levels)

    def _sampled_rows(self, caps: list[int]) -> _SampledRows | None:
        """The rows of a tree block that sample (None: all greedy), with their uniforms
        ``[S, 2N + 1]``: node draws, acceptance draws, the final draw. A seeded row takes them
        from its own generator, ``2N + 1`` numbers (1 when its cap is 0, like a chain block
        with nothing to draft), so what it consumes depends on its own state only."""
        chosen = [i for i, row in enumerate(self.rows) if not row.request.sampling.greedy]
        if not chosen:
            return None
        width = 2 * self.tree.size + 1
        uniforms = torch.rand(len(chosen), width, generator=self.generator, device=self.device)
        for slot, index in enumerate(chosen):
            generator = self.rows[index].generator
            if generator is None:
                continue
            own = torch.rand(width if caps[index] > 0 else 1, generator=generator,
                             device=self.device)
            uniforms[slot, -own.shape[0]:] = own
        samplings = [self.rows[i].request.sampling for i in chosen]
        return _SampledRows(torch.tensor(chosen, device=self.device), samplings, uniforms)

    def _draft_tree(self, sampled: _SampledRows | None):
        """The tree's node tokens ``[B, N]``: the draft reads each row's pending tokens, then the
        internal nodes one level per call (each sees its ancestors only). Returns the tokens,
        the sampled rows' q ``[S, 1 + len(internal), V]`` (None: no sampled row), the first
        draft slot holding a node, the nodes fed (in slot order) and the call count."""
        tree, batch = self.tree, len(self.rows)
        width = max(len(row.draft_pending) for row in self.rows)
        self.draft.make_room(width + len(tree.internal))
        pads = [width - len(row.draft_pending) for row in self.rows]
        tokens = torch.tensor(
            [[0] * pad + row.draft_pending for row, pad in zip(self.rows, pads)],
            device=self.device,
        )
        logits = self.draft.forward(tokens, pads, logits_to_keep=1)[:, -1:]
        node_tokens = torch.zeros(batch, tree.size, dtype=torch.long, device=self.device)
        draft_probs: list[torch.Tensor] = []
        self._tree_children(logits, (-1,), node_tokens, sampled, draft_probs)
        start, fed = self.draft.length, []
        for level, offsets, visible in self._tree_levels:
            call = TreeCall(start, offsets, visible, self._last_position)
            logits = self.draft.forward(node_tokens[:, level], tree=call,
                                        logits_to_keep=len(level))
            self._tree_children(logits, level, node_tokens, sampled, draft_probs)
            fed += level
        probs = torch.stack(draft_probs, dim=1) if draft_probs else None
        return node_tokens, probs, start, fed, 1 + len(self._tree_levels)

    def _tree_children(self, logits, parents, node_tokens, sampled, draft_probs: list) -> None:
        """Fill the children of ``parents`` from the draft's logits after each ``[B, P, V]``:
        the top-k tokens for greedy rows (``tree_node_tokens``), i.i.d. draws from the warped q
        for sampled rows (``tree_node_samples``), whose q is appended to ``draft_probs``: the
        very distribution the draws came from, which the rule divides by."""
        for column, parent in enumerate(parents):
            tree_node_tokens(self.tree, logits[:, column], parent, node_tokens)
        if sampled is None:
            return
        probs = warp_rows(pad_vocab(logits[sampled.index], self.vocab), sampled.samplings)
        draws = sampled.uniforms[:, : self.tree.size]
        for column, parent in enumerate(parents):
            draft_probs.append(probs[:, column])
            children, tokens = tree_node_samples(self.tree, probs[:, column], parent, draws)
            if children:
                where = torch.tensor(children, device=self.device)
                node_tokens[sampled.index.unsqueeze(1), where.unsqueeze(0)] = tokens

    def _tree_plan(self, tree: Tree) -> list[tuple[list[int], tuple[int, ...], torch.Tensor]]:
        """Per draft call after the first: the internal nodes of one level, their position
        offsets and what each sees among the nodes fed so far (its ancestors and itself)."""
        plan, fed = [], []
        for depth in range(1, tree.depth):
            level = [n for n in tree.level(depth) if n in tree.internal]
            visible = tree.ancestors(fed + level)[len(fed):].to(self.device)
            plan.append((level, (depth - 1,) * len(level), visible))
            fed += level
        return plan

    def _verify_tree(self, node_tokens, draft_probs, caps, sampled):
        """One target pass over ``[pending, nodes]`` (node n at depth(n) past the pending token,
        seeing its ancestors), then each row's rule; returns the first slot written (after any
        compaction), the logits and ``(path, num_accepted, next_tokens, alpha_sum, levels)``."""
        tree = self.tree
        self.target.make_room(tree.size + 1)
        start = self.target.length
        pending = torch.tensor([[row.target_pending] for row in self.rows], device=self.device)
        call = TreeCall(start, (0, *tree.depths), self._tree_verify, self._last_position)
        logits = self.target.forward(torch.cat([pending, node_tokens], dim=1), tree=call)
        max_accepted = torch.tensor(caps, device=self.device)
        path, count, next_tokens = accept_tree_greedy(tree, node_tokens, greedy_tokens(logits),
                                                      max_accepted)
        outcome = (path, count, next_tokens, *self._greedy_tree_alpha(path, count, max_accepted))
        if sampled is not None:  # the per-row mode mask: sampled rows replace their results
            index = sampled.index
            target_probs = warp_rows(pad_vocab(logits[index], self.vocab), sampled.samplings)
            size = tree.size
            chosen = verify_tree(
                tree, node_tokens[index], draft_probs, target_probs,
                max_accepted=max_accepted[index], lenience=self.speculation.lenience,
                epsilon=self.speculation.epsilon,
                uniforms=(sampled.uniforms[:, size : 2 * size], sampled.uniforms[:, -1]))
            stats = tree_acceptance(tree, chosen[0], chosen[1], max_accepted[index],
                                    draft_probs, target_probs)
            for whole, part in zip(outcome, (*chosen, *stats)):
                whole[index] = part.to(whole.dtype)
        return start, logits, outcome

    def _greedy_tree_alpha(self, path, count, max_accepted):
        """Greedy rows' alpha: accepted nodes that were the draft's top-1 token, over the levels
        verified where the top-1 token was proposed (after a node without a rank-0 child the
        next level is not a miss); ``[B]`` each."""
        top1 = (self._tree_rank0[path] & (path >= 0)).sum(dim=1)
        last = path.gather(1, (count - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
        last = torch.where(count > 0, last, -1)
        proposed = self._tree_top1_parent[last + 1]
        return top1.double(), count + ((count < max_accepted) & proposed).long()

    @torch.inference_mode()
    def replace_draft(self, draft: PreTrainedModel | None) -> None:
        """Swap the draft between steps (e.g. a better one distilled online): live rows keep
        going; the new draft's cache is filled with each row's context in one batched prefill.
        Lossless whatever the draft, so in-flight outputs are unchanged for greedy rows."""
        if draft is None:
            self.draft = None
            return
        ensure_croppable(draft)
        cached = CachedModel(draft)
        if self.rows:
            contexts = [row.request.prompt_ids + row.output for row in self.rows]
            known = [c[: len(c) - len(row.draft_pending)] for c, row in zip(contexts, self.rows)]
            width = max(map(len, known))
            rows = cached.add_rows(len(known))
            longest = max(len(c) + row.remaining for c, row in zip(contexts, self.rows))
            cached.reserve(cached.rows, longest + self.speculation.gamma + 2)
            if width > 0:
                tokens = torch.tensor([[0] * (width - len(k)) + k for k in known], device=self.device)
                cached.forward(tokens, [width - len(k) for k in known], rows=rows,
                               right_align=True, logits_to_keep=1)
        self.draft = cached
        models = [self.target.model, draft]
        self.vocab = max(output_width(m) for m in models)

    def _uniforms(self, caps: list[int], gamma: int) -> torch.Tensor:
        """``[B, 2 gamma + 1]``: draft draws, acceptance draws, then the final draw.

        A seeded row draws exactly ``2 cap + 1`` numbers from its own generator, so what it
        consumes depends on its own state only.
        """
        width = 2 * gamma + 1
        uniforms = torch.rand(
            len(self.rows), width, generator=self.generator, device=self.device
        )
        for index, (row, cap) in enumerate(zip(self.rows, caps)):
            if row.generator is None:
                continue
            own = torch.rand(2 * cap + 1, generator=row.generator, device=self.device)
            uniforms[index, :cap] = own[:cap]
            uniforms[index, gamma : gamma + cap] = own[cap : 2 * cap]
            uniforms[index, -1] = own[-1]
        return uniforms

    def _samplings(self) -> list[SamplingConfig]:
        return [row.request.sampling for row in self.rows]

    def _draft_block(self, caps: list[int], uniforms: torch.Tensor):
        """Sample up to ``max(caps)`` tokens per row; return them, their q and each row's length.

        With a confidence threshold a row proposes a token and then stops if the draft's top
        probability for it was below the threshold; drafting ends when no row is still going.
        """
        batch, planned = len(self.rows), uniforms.shape[1]
        caps_tensor = torch.tensor(caps, device=self.device)
        if planned == 0:
            empty = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
            no_probs = None if self.greedy else torch.zeros(batch, 0, self.vocab, device=self.device)
            return empty, no_probs, caps_tensor
        width = max(len(row.draft_pending) for row in self.rows)
        pads = [width - len(row.draft_pending) for row in self.rows]
        tokens = torch.tensor(
            [[0] * pad + row.draft_pending for row, pad in zip(self.rows, pads)],
            device=self.device,
        )
        threshold = self.speculation.confidence_threshold
        lengths, going = caps_tensor, caps_tensor > 0
        drafted, probs = [], []
        samplings = self._samplings()
        for position in range(planned):
            logits = self.draft.forward(tokens, pads, logits_to_keep=1)[:, -1]
            if self.greedy:  # one-hot q: the argmax is all we need
                token = greedy_tokens(logits)
            else:
                logits = pad_vocab(logits, self.vocab)
                draft_probs = warp_rows(logits, samplings)
                token = sample(draft_probs, uniforms=uniforms[:, position])
                probs.append(draft_probs)
            drafted.append(token)
            tokens, pads = token.unsqueeze(1), [0] * batch
            if threshold > 0:
                confident = torch.softmax(logits.float(), dim=-1).amax(dim=-1) >= threshold
                lengths = torch.where(going, torch.full_like(lengths, position + 1), lengths)
                going = going & confident & (lengths < caps_tensor)
                if position + 1 < planned and not bool(going.any()):  # one sync, adaptive only
                    break
        draft_probs = torch.stack(probs, dim=1) if probs else None
        return torch.stack(drafted, dim=1), draft_probs, lengths

    def _verify_block(self, draft_tokens, draft_probs, lengths, uniforms):
        """One target pass over ``[pending, x_1..x_g]`` and the acceptance rule; returns the
        outcome, the per-position acceptance sum_v min(p, q) ``[B, g]`` (for alpha) and the
        target's logits (for log-probabilities).

        ``uniforms`` = (acceptance draws ``[B, g]``, final draws ``[B]``).
        """
        pending = torch.tensor([[row.target_pending] for row in self.rows], device=self.device)
        inputs = torch.cat([pending, draft_tokens], dim=1)
        logits = self.target.forward(inputs)
        gamma = draft_tokens.shape[1]
        if self.greedy:  # p and q one-hot: acceptance is argmax equality
            target_tokens = greedy_tokens(logits)
            outcome = verify_greedy(draft_tokens, target_tokens, lengths)
            return outcome, (draft_tokens == target_tokens[:, :gamma]).float(), logits
        target_probs = warp_rows(pad_vocab(logits, self.vocab), self._samplings())
        outcome = verify(
            draft_tokens,
            draft_probs,
            target_probs,
            draft_lengths=lengths,
            lenience=self.speculation.lenience,
            epsilon=self.speculation.epsilon,
            uniforms=uniforms,
        )
        return outcome, analytic_acceptance(target_probs[:, :gamma], draft_probs), logits

    def _chain_logprobs(self, logits, draft_tokens, outcome) -> list:
        """Per row, the target's log-probabilities at each position of a chain block: x_1..x_n
        then the next token at position n (rows that did not ask: None)."""
        tops = [row.request.logprobs for row in self.rows]
        if all(top is None for top in tops):
            return tops
        taken = torch.cat([draft_tokens, outcome.next_tokens.unsqueeze(1)], dim=1)
        taken.scatter_(1, outcome.num_accepted.unsqueeze(1), outcome.next_tokens.unsqueeze(1))
        return host_logprobs(logits, taken, tops)

    def _tree_logprobs(self, updates, logits, kept: list[list[int]], taken: list[list[int]]):
        """Log-probabilities of a tree block's path: the token after kept slot i is taken[i]."""
        tops = [row.request.logprobs for row in self.rows]
        if all(top is None for top in tops):
            return
        width = max(map(len, kept))
        index = torch.tensor([k + [0] * (width - len(k)) for k in kept], device=self.device)
        tokens = torch.tensor([t + [0] * (width - len(t)) for t in taken], device=self.device)
        rows = torch.arange(len(kept), device=self.device).unsqueeze(1)
        for update, entries in zip(updates, host_logprobs(logits[rows, index], tokens, tops)):
            update.logprobs = _first(entries, len(update.new_tokens))

    def _to_host(self, draft_tokens, lengths, outcome, alpha) -> list[tuple]:
        """One device-to-host transfer of the block's results, unpacked per row."""
        gamma = draft_tokens.shape[1]
        # alpha is summed over the verified positions: 1..min(n + 1, length)
        verified = torch.minimum(outcome.num_accepted + 1, lengths)
        in_prefix = torch.arange(gamma, device=self.device).unsqueeze(0) < verified.unsqueeze(1)
        alpha_sums = (alpha * in_prefix).sum(dim=1, dtype=torch.float64)
        packed = torch.cat(
            [
                draft_tokens.double(),
                lengths.double().unsqueeze(1),
                outcome.num_accepted.double().unsqueeze(1),
                outcome.next_tokens.double().unsqueeze(1),
                alpha_sums.unsqueeze(1),
            ],
            dim=1,
        ).tolist()
        return [
            ([int(t) for t in row[:gamma]], int(row[gamma]), int(row[gamma + 1]), int(row[gamma + 2]), row[gamma + 3])
            for row in packed
        ]

    def _rollback(self, host: list[tuple], gamma: int) -> None:
        """Target: drop the g - n rejected slots; draft: x_{n+1}..x_{g-1} (x_g was never fed)."""
        accepted = [item[2] for item in host]
        self.target.rollback([gamma - n for n in accepted])
        if self.draft is not None and gamma > 0:
            self.draft.rollback([max(gamma - 1 - n, 0) for n in accepted])

    # -- joining and leaving ---------------------------------------------------------------------

    def _admit(self) -> list[RowUpdate]:
        """Prefill queued rows (every prompt token but the last) into both caches."""
        cancelled = [row for row in self.queue if row.finish_reason is not None]
        joining = [row for row in self.queue if row.finish_reason is None]
        self.queue = []
        self.finished += cancelled
        updates = [RowUpdate(r.request.request_id, [], True, r.finish_reason) for r in cancelled]
        if not joining:
            return updates
        prompts = [row.request.prompt_ids[:-1] for row in joining]
        width = max(map(len, prompts))
        longest = max(len(row.request.prompt_ids) + row.request.max_new_tokens for row in joining)
        slots = self.target.length + longest + self.speculation.gamma + 2
        models = [m for m in (self.target, self.draft) if m is not None]
        pads = [width - len(p) for p in prompts]
        # A row scoring its prompt needs every prefill position's logits from the target.
        scoring = any(row.request.prompt_logprobs is not None for row in joining)

        def prefill() -> torch.Tensor | None:
            logits = None
            for cached in models:
                rows = cached.add_rows(len(joining))
                cached.reserve(cached.rows, slots)
                if width > 0:
                    tokens = torch.tensor(
                        [[0] * pad + p for p, pad in zip(prompts, pads)], device=self.device
                    )
                    keep = 0 if scoring and cached is self.target else 1
                    out = cached.forward(tokens, pads, rows=rows, right_align=True,
                                         logits_to_keep=keep)
                    logits = out if cached is self.target else logits
            return logits

        seconds, logits = timed(prefill, device=self.device)
        self.metrics.prefill_time_s += seconds
        passes = int(width > 0)
        self.metrics.prefill_passes += passes
        self.metrics.target_forward_passes += passes
        self.metrics.draft_forward_passes += passes if self.draft is not None else 0
        for row in joining:
            row.target_pending = row.request.prompt_ids[-1]
            row.draft_pending = [row.request.prompt_ids[-1]]
            if row.request.max_new_tokens == 0:  # a scoring request: done once scored
                row.finish_reason = "length"
        self.rows += joining
        if scoring:
            updates += self._prompt_logprobs(joining, logits, pads)
        return updates

    def _prompt_logprobs(self, joining: list[_Row], logits, pads: list[int]) -> list[RowUpdate]:
        """Each scoring row's prompt tokens under the target, from the prefill's logits: the
        logits at prefill column pad + i predict prompt token i + 1 (the first has none)."""
        updates = []
        for index, (row, pad) in enumerate(zip(joining, pads)):
            top, prompt = row.request.prompt_logprobs, row.request.prompt_ids
            if top is None:
                continue
            entries: list = [None]
            if len(prompt) > 1:
                taken = torch.tensor([prompt[1:]], device=self.device)
                entries += host_logprobs(logits[index : index + 1, pad:], taken, [top])[0]
            updates.append(RowUpdate(row.request.request_id, [], False, None,
                                     prompt_logprobs=entries))
        return updates

    def _leave(self, report: bool = False) -> list[RowUpdate]:
        """Drop finished rows from both caches (``report``: say so, for cancelled rows)."""
        leaving = [i for i, row in enumerate(self.rows) if row.finish_reason is not None]
        if not leaving:
            return []
        gone = [self.rows[i] for i in leaving]
        self.finished += gone
        for cached in (self.target, self.draft):
            if cached is not None:
                order = cached.remove_rows(leaving)  # the same order for both caches
        self.rows = [self.rows[i] for i in order]
        if not report:
            return []
        return [RowUpdate(r.request.request_id, [], True, r.finish_reason) for r in gone]


def _first(entries: list | None, count: int) -> list | None:
    """The first ``count`` entries (the tokens a row really emitted), or None."""
    return None if entries is None else entries[:count]

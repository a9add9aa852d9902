"""The step-level speculative decoding engine: ``Decoder``, a short loop over block strategies.

``add`` queues a request at any time; ``step`` admits queued requests (one batched prefill per
model; on a chain step the target reads the joining prompts in the step's own pass), runs one
block for every live row through a strategy (``decoding/strategy.py``:
``chain.ChainStep``, a line of up to gamma draft tokens, or no draft: plain decoding;
``tree_step.TreeStep``, a static token tree) and returns each row's new tokens; finished rows
leave. Row bookkeeping lives on the host. A seeded row draws from its own generator and its
draft length depends only on its own state, so a seeded or greedy row produces exactly what it
would alone, whatever shares the batch. Times are measured only through an optional ``probe``
(``timing.SyncTimer``): without one, a step never waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel

from distillspec.decoding.chain import ChainStep
from distillspec.decoding.dynamic_tree_step import DynamicTreeStep
from distillspec.decoding.kv_cache import CachedModel, ensure_croppable
from distillspec.decoding.logprobs import prompt_logprobs
from distillspec.decoding.lookup_step import LookupStep
from distillspec.decoding.metrics import DecodeCounts, GenerationMetrics
from distillspec.decoding.params import SpeculationConfig
from distillspec.decoding.requests import (
    Request,
    RowUpdate,
    _Row,
    check_request,
    context_length,
    output_width,
)
from distillspec.decoding.strategy import Strategy, caps_for
from distillspec.decoding.timing import Probe
from distillspec.decoding.tree import DynamicTree
from distillspec.decoding.tree_step import TreeStep

T = TypeVar("T")
# Rows joining a chain step (plain or drafting) read their prompts in the step's target pass (a
# ragged call) rather than in a prefill pass of their own; off: always a prefill (the side-by-side
# scripts' switch).
RAGGED_JOINS = True


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


def make_tree_step(models, tree) -> Strategy:
    """The strategy of a parsed tree: a static ``Tree`` or a ``DynamicTree``."""
    if isinstance(tree, DynamicTree):
        return DynamicTreeStep(models, tree)
    return TreeStep(models, tree)


class Decoder:
    """A set of live rows decoded together, one speculative block per ``step()``.

    ``probe``: measures each phase of a step (``timing.SyncTimer(device)``) into
    ``metrics.prefill_time_s`` / ``draft_time_s`` / ``target_time_s``; None measures nothing
    and adds no device synchronisation."""

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None = None,
        speculation: SpeculationConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
        probe: Probe | None = None,
    ):
        ensure_croppable(target)
        if draft is not None:
            ensure_croppable(draft)
        if deterministic:
            check_deterministic(target, draft)
        self.speculation = speculation or SpeculationConfig()
        self.device = target.device
        self.generator = generator
        self.probe = probe
        models = [m for m in (target, draft) if m is not None]
        self.vocab = max(output_width(m) for m in models)
        self.context = min((c for c in map(context_length, models) if c), default=None)
        self.target = CachedModel(target)
        self.draft = CachedModel(draft) if draft is not None else None
        self.rows: list[_Row] = []
        self.queue: list[_Row] = []
        self.finished: list[_Row] = []
        self.metrics = GenerationMetrics(rows=[], finish_reasons=[])
        self.chain = ChainStep(self)
        self.plain = ChainStep(self, plain=True)
        # Set by a caller between steps (the server's ModePolicy): None speculates as configured,
        # k caps every row's draft at k tokens (a chain), 0 decodes plain with the draft kept.
        self.lookahead_limit: int | None = None
        # Set by a caller between steps (a server whose batch runs plain for good): rows
        # admitted while True skip the draft's prefill, and the draft reads their prompts in its
        # first drafting step, so a row that ends before one never costs the draft anything.
        self.defer_draft_prefill = False
        # Tree drafting (decoding/tree_step.py): the typed tree, parsed once by the config.
        self.tree = self.speculation.tree_shape if draft is not None else None
        self.tree_step = make_tree_step(self, self.tree) if self.tree is not None else None
        # Prompt lookup (decoding/lookup_step.py), with or without a draft; ``ran_lookup``: the
        # last step was such a block (a server's policy measures its arm, which that is not).
        spec, self.ran_lookup = self.speculation, False
        self.lookup = LookupStep(self, spec.lookup, spec.lookup_ngram) if spec.lookup else None

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
        check_request(request, self.vocab, self.context)

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
        updates = self._admit(self._joins_ragged()) + self._leave(report=True)
        if not self.rows:
            return updates
        strategy = self._strategy()
        lookahead = strategy.lookahead
        if self.lookahead_limit is not None:
            lookahead = min(lookahead, self.lookahead_limit)
        caps = caps_for(self.rows, lookahead)
        self.ran_lookup = strategy is self.lookup
        return updates + strategy.step(self.rows, caps) + self._leave()

    def _strategy(self) -> Strategy:
        """With no lookahead limit: prompt lookup if set and every row has a match, else the
        tree (greedy and sampled rows alike) if a draft is set and some row can still
        draft a node; else the chain (with no draft or a limit of 0: plain decoding)."""
        if self.lookup is not None and self.lookahead_limit is None and self.lookup.ready(self.rows):
            return self.lookup
        if self.lookahead_limit == 0 and self.draft is not None:
            return self.plain
        tree = self.tree_step if self.lookahead_limit is None else None
        drafting = tree is not None and self.draft is not None
        if drafting and max(caps_for(self.rows, tree.lookahead)) > 0:
            return tree
        return self.chain

    def measure(self, phase: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``; with a probe, its seconds are added to ``metrics.<phase>_time_s``."""
        if self.probe is None:
            return fn(*args)
        seconds, result = self.probe(fn, *args)
        name = f"{phase}_time_s"
        setattr(self.metrics, name, getattr(self.metrics, name) + seconds)
        return result

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
            _fill_draft(cached, self.rows, self.draft is None, self.speculation.gamma, self.device)
        self.draft = cached
        models = [self.target.model, draft]
        self.vocab = max(output_width(m) for m in models)

    # -- joining and leaving ---------------------------------------------------------------------

    def _joins_ragged(self) -> bool:
        """Whether queued rows skip the target's prefill and read their prompts in this step's
        target pass instead (a ragged call, ``decoding/ragged.py``): when the step is a chain
        (plain decoding, a chain of drafts, or a lookahead limit that makes one of a tree; a
        tree's verify has its own attention mask), the target takes ragged calls and no
        joining row scores its prompt (that needs every position's logits)."""
        chain = self.draft is None or self.tree is None or self.lookahead_limit is not None
        return chain and self.chain_reads_joins()

    def chain_reads_joins(self) -> bool:
        """Whether the queued rows would read their prompts in a chain step's target pass (a
        caller choosing between a tree and a chain for an admitting step asks)."""
        return (bool(self.queue) and RAGGED_JOINS and self.target.takes_ragged
                and all(row.request.prompt_logprobs is None and row.request.max_new_tokens > 0
                        for row in self.queue))

    def _admit(self, ragged: bool = False) -> list[RowUpdate]:
        """Prefill queued rows (every prompt token but the last) into both caches; with
        ``ragged``, the target's part waits in ``target_prefix`` for the step's own pass."""
        cancelled = [row for row in self.queue if row.finish_reason is not None]
        joining = [row for row in self.queue if row.finish_reason is None]
        self.queue = []
        self.finished += cancelled
        updates = [RowUpdate(r.request.request_id, [], True, r.finish_reason) for r in cancelled]
        if not joining:
            return updates
        prompts = [row.request.prompt_ids[:-1] for row in joining]
        width = max(map(len, prompts))
        pads = [width - len(p) for p in prompts]
        # A row scoring its prompt needs every prefill position's logits from the target.
        scoring = any(row.request.prompt_logprobs is not None for row in joining)
        logits = self.measure("prefill", self._prefill, joining, prompts, pads, scoring, ragged)
        prefilled = self._prefills_draft
        target_pass, draft_pass = int(width > 0 and not ragged), int(width > 0 and prefilled)
        self.metrics.prefill_passes += max(target_pass, draft_pass)
        self.metrics.target_prefill_passes += target_pass
        self.metrics.draft_prefill_passes += draft_pass
        self.metrics.target_forward_passes += target_pass
        self.metrics.draft_forward_passes += draft_pass
        for row, prefix in zip(joining, prompts):
            row.target_pending = row.request.prompt_ids[-1]
            row.target_prefix = list(prefix) if ragged else []
            prompt = row.request.prompt_ids
            row.draft_pending = [prompt[-1]] if prefilled else list(prompt)
            if row.request.max_new_tokens == 0:  # a scoring request: done once scored
                row.finish_reason = "length"
        self.rows += joining
        if scoring:
            updates += prompt_logprobs(joining, logits, pads, self.device)
        return updates

    def _prefill(self, joining: list[_Row], prompts: list[list[int]], pads: list[int],
                 scoring: bool, ragged: bool = False) -> torch.Tensor | None:
        """Add the joining rows to each cache and prefill their prompts (right-aligned to the
        write pointer; the target's not with ``ragged``); the target's logits (every
        position's when ``scoring``)."""
        width = max(map(len, prompts))
        # A prompt ends at the pointer (right-aligned), so a row needs room past it only for
        # its last prompt token, its budget and a block's lookahead (counting the prompt again
        # doubled the capacity, memory that is never given back, of a server admitting rows
        # into a running batch).
        budget = (max(row.request.max_new_tokens for row in joining) + 3
                  + max(self.speculation.gamma, self.speculation.lookup))
        logits = None
        for cached in (m for m in (self.target, self.draft) if m is not None):
            rows = cached.add_rows(len(joining))
            if cached is self.draft and not self._prefills_draft:
                continue  # the prompts stay in the rows' draft_pending (see _admit)
            cached.reserve(cached.rows, max(cached.length, width) + budget)
            if cached is self.target and ragged:
                continue  # they stay in the rows' target_prefix (see _admit)
            if width > 0:
                tokens = torch.tensor(
                    [[0] * pad + p for p, pad in zip(prompts, pads)], device=self.device
                )
                keep = 0 if scoring and cached is self.target else 1
                out = cached.forward(tokens, pads, rows=rows, right_align=True,
                                     logits_to_keep=keep)
                logits = out if cached is self.target else logits
        return logits

    @property
    def _prefills_draft(self) -> bool:
        """Whether joining rows' prompts go into the draft's cache now (else they wait in
        ``draft_pending`` for the first drafting step)."""
        return self.draft is not None and not self.defer_draft_prefill

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


def _fill_draft(cached: CachedModel, rows: list[_Row], had_none: bool, gamma: int,
                device) -> None:
    """A new draft's cache for the live rows, in one batched prefill: each row's context but
    its ``draft_pending`` (what any draft reads in its next block). After decoding with no
    draft, nothing kept ``draft_pending`` current: it becomes the context's last token."""
    contexts = [row.request.prompt_ids + row.output for row in rows]
    if had_none:
        for row, context in zip(rows, contexts):
            row.draft_pending = context[-1:]
    known = [c[: len(c) - len(row.draft_pending)] for c, row in zip(contexts, rows)]
    width = max(map(len, known))
    added = cached.add_rows(len(known))
    longest = max(len(c) + row.remaining for c, row in zip(contexts, rows))
    cached.reserve(cached.rows, longest + gamma + 2)
    if width > 0:
        tokens = torch.tensor([[0] * (width - len(k)) + k for k in known], device=device)
        cached.forward(tokens, [width - len(k) for k in known], rows=added, right_align=True,
                       logits_to_keep=1)

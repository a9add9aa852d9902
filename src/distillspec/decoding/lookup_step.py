"""The prompt lookup strategy: a chain block whose tokens are copied from each row's own
context (``ngram.NgramIndex``) instead of drafted.

The ``Decoder`` runs it in place of its configured block (chain, tree or plain) when every live
row finds a match and no seeded sampled row is live; otherwise the configured block runs. The
target verifies the copied tokens in one pass exactly as it verifies a chain of draft tokens
(the choice of block never depends on this step's draws). Greedy rows compare argmaxes, so the
output is the target's own greedy decoding (token for token in float32; in bf16 a verify of
another width may flip near-tied logits, as for any SD). Sampled rows use the lossless rule
with the proposal's own distribution, one-hot at the copied token x (it is a function of the
context, drawn from nothing): x is accepted with probability min(1, p(x) / 1) = p(x), and after
a rejection the next token comes from norm(max(0, p - onehot(x))), p without x; so the output
follows the target's distribution exactly, whichever block the context picked. The draft, if
any, does not run: the block's tokens wait in each row's ``draft_pending`` and the draft reads
them in its next block, one wider forward (as after a plain block).
"""

from __future__ import annotations

import torch
from torch.nn.functional import one_hot

from distillspec.decoding.chain import ChainStep
from distillspec.decoding.ngram import NgramIndex
from distillspec.decoding.requests import RowUpdate, _Row
from distillspec.decoding.strategy import Models, first


class LookupStep(ChainStep):
    """Verify up to ``tokens`` copied tokens per row (``Strategy``); ``ready`` says whether it
    can run for the live rows and keeps their proposals for ``step``."""

    drafts_with_model = False

    def __init__(self, models: Models, tokens: int, shortest_ngram: int):
        super().__init__(models)
        self.tokens, self.shortest_ngram = tokens, shortest_ngram
        self._proposals: list[list[int]] = []

    @property
    def lookahead(self) -> int:
        return self.tokens

    def ready(self, rows: list[_Row]) -> bool:
        """Whether every row copies at least one token (then ``step`` runs on these
        proposals); a row one token from its budget copies none and so waits. Never while a
        seeded sampled row is live: whether a block copies depends on every row, and that
        row's draws must not depend on what shares its batch."""
        if not rows or any(row.generator is not None and not row.request.sampling.greedy
                           for row in rows):
            return False
        proposals = []
        for row in rows:
            if row.ngrams is None:
                row.ngrams = NgramIndex(self.shortest_ngram)
            proposal = row.ngrams.propose(row.context, min(self.tokens, row.remaining - 1))
            if not proposal:
                return False
            proposals.append(proposal)
        self._proposals = proposals
        return True

    def _draft(self, rows: list[_Row], caps: list[int], uniforms: torch.Tensor, greedy: bool):
        """The proposals ``ready`` found, cut at each row's cap, right-padded with zeros (the
        verify stops each row at its own length) to the longest, or for a compiled target to a
        power of two at most the widest cap, so that it compiles few widths (eager, a padded
        column costs verify time): ``(tokens [B, W], probs, lengths [B])``; ``probs`` is None
        for a greedy block, else the one-hot proposals ``[B, W, V]`` (float32)."""
        proposals = [proposal[:cap] for proposal, cap in zip(self._proposals, caps)]
        width = max(map(len, proposals))
        if self.models.target.compiled and width:
            width = min(max(caps), 1 << (width - 1).bit_length())
        tokens = torch.tensor([p + [0] * (width - len(p)) for p in proposals],
                              dtype=torch.long, device=self.models.device)
        lengths = torch.tensor([len(p) for p in proposals], device=self.models.device)
        probs = None if greedy else one_hot(tokens, self.models.vocab).float()
        return tokens, probs, lengths

    def _update(self, row: _Row, values: tuple, gamma: int, logprobs) -> RowUpdate:
        """The row's new state; the draft (if any) reads the block's kept tokens later."""
        proposed, length, accepted, token, _ = values
        kept = proposed[:accepted] + [token]
        row.target_pending = token
        if self.models.draft is not None:
            row.draft_pending = row.draft_pending + kept
        row.counts.record_lookup(length, accepted)
        new = row.emit(kept)
        return RowUpdate(row.request.request_id, new, row.finish_reason is not None,
                         row.finish_reason, 0, 0, first(logprobs, len(new)))

    def _rollback(self, host: list[tuple], gamma: int) -> None:
        """Only the target read the block: it drops its g - n rejected slots."""
        self.models.target.rollback([gamma - item[2] for item in host])

"""The chain strategy: one speculative block of drafted lines, verified in one target pass.

1. each row's cap is ``min(gamma, its remaining budget - 1)``; the draft samples the longest of
   them autoregressively (a row stops proposing early, with adaptive drafting, after a token the
   draft is unsure of): tokens x_1..x_g and the warped q_1..q_g they came from;
2. the target scores ``[pending, x_1..x_g]`` in one forward pass: p_1..p_{g+1};
3. ``acceptance.verify`` keeps a prefix of n tokens per row and samples one more token
   (residual after a rejection, bonus after a full acceptance);
4. both caches forget their rejected slots; a row that accepted all g tokens feeds x_g and the
   new token to the draft first in the next block;
5. tokens are emitted per row, cut at the first stop id and the budget (a row that asks for
   log-probabilities gets the target's, from step 2's logits).

The block's results reach the host in one transfer (two on a step that rows join). A seeded
row draws its ``2 cap + 1`` uniforms from its own generator, so what it consumes depends on its
own state only. Plain
decoding (no draft) is the same block with g = 0; an all-greedy block compares argmaxes.
"""

from __future__ import annotations

import torch

from distillspec.decoding.acceptance import analytic_acceptance, verify, verify_greedy
from distillspec.decoding.logprobs import host_logprobs
from distillspec.decoding.requests import RowUpdate, _Row
from distillspec.decoding.sampling import (
    draft_greedy_tokens,
    greedy_tokens,
    kept_columns,
    pad_vocab,
    sample,
    warp_rows,
)
from distillspec.decoding.strategy import Models, first, pending_tokens


class ChainStep:
    """Draft up to each row's cap in a line, verify, roll back (``Strategy``).

    ``plain``: a block of plain decoding while a draft is set (a server that found speculation
    slower at this batch size): nothing is drafted, and each row's new token is queued for the
    draft, which reads all it missed in the first block that drafts again (one wider forward)."""

    drafts_with_model = True  # False: the block's tokens come from elsewhere (lookup_step.py)

    def __init__(self, models: Models, plain: bool = False):
        self.models = models
        self.plain = plain

    @property
    def lookahead(self) -> int:
        models = self.models
        return models.speculation.gamma if models.draft is not None and not self.plain else 0

    def step(self, rows: list[_Row], caps: list[int]) -> list[RowUpdate]:
        models = self.models
        greedy = all(row.request.sampling.greedy for row in rows)
        planned = max(caps)
        uniforms = (
            torch.zeros(len(rows), 2 * planned + 1, device=models.device)
            if greedy
            else self._uniforms(rows, caps, planned)
        )
        draft_args = (rows, caps, uniforms[:, :planned], greedy)
        draft_tokens, draft_probs, lengths = (
            models.measure("draft", self._draft, *draft_args) if self.drafts_with_model
            else self._draft(*draft_args))  # copied tokens: host work, not a draft phase
        gamma = draft_tokens.shape[1]  # adaptive drafting may stop before `planned`
        accept_uniforms = uniforms[:, planned : planned + gamma]
        outcome, alpha, logits = models.measure(
            "target", self._verify, rows, draft_tokens, draft_probs, lengths,
            (accept_uniforms, uniforms[:, -1]), greedy)
        models.metrics.draft_forward_passes += gamma if self.drafts_with_model else 0
        models.metrics.target_forward_passes += 1
        host = self._to_host(draft_tokens, lengths, outcome, alpha)
        logprobs = self._logprobs(rows, logits, draft_tokens, outcome)
        self._rollback(host, gamma)
        return [self._update(row, values, gamma, entries)
                for row, values, entries in zip(rows, host, logprobs)]

    def _update(self, row: _Row, values: tuple, gamma: int, logprobs) -> RowUpdate:
        """One row's new state and update from its unpacked block results."""
        drafted, length, accepted, token, alpha_sum = values
        drafting = self.models.draft is not None and not self.plain
        row.target_pending = token
        if self.plain and self.models.draft is not None:
            row.draft_pending = row.draft_pending + [token]
            row.counts.target_calls += 1
        elif drafting:
            row.draft_pending = [drafted[-1], token] if accepted == gamma > 0 else [token]
            row.counts.record_block(length, accepted, alpha_sum, min(accepted + 1, length))
            row.counts.draft_calls += gamma
        else:
            row.counts.target_calls += 1
        new = row.emit(drafted[:accepted] + [token])
        return RowUpdate(row.request.request_id, new, row.finish_reason is not None,
                         row.finish_reason, length if drafting else 0, accepted,
                         first(logprobs, len(new)))

    def _uniforms(self, rows: list[_Row], caps: list[int], gamma: int) -> torch.Tensor:
        """``[B, 2 gamma + 1]``: draft draws, acceptance draws, then the final draw.

        A seeded row draws exactly ``2 cap + 1`` numbers from its own generator, so what it
        consumes depends on its own state only.
        """
        device = self.models.device
        uniforms = torch.rand(len(rows), 2 * gamma + 1, generator=self.models.generator,
                              device=device)
        for index, (row, cap) in enumerate(zip(rows, caps)):
            if row.generator is None:
                continue
            own = torch.rand(2 * cap + 1, generator=row.generator, device=device)
            uniforms[index, :cap] = own[:cap]
            uniforms[index, gamma : gamma + cap] = own[cap : 2 * cap]
            uniforms[index, -1] = own[-1]
        return uniforms

    def _draft(self, rows: list[_Row], caps: list[int], uniforms: torch.Tensor, greedy: bool):
        """Sample up to ``max(caps)`` tokens per row; return them, their q and each row's length.

        With a confidence threshold a row proposes a token and then stops if the draft's top
        probability for it was below the threshold; drafting ends when no row is still going.
        """
        models = self.models
        batch, planned, device = len(rows), uniforms.shape[1], models.device
        caps_tensor = torch.tensor(caps, device=device)
        if planned == 0:
            empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
            no_probs = None if greedy else torch.zeros(batch, 0, models.vocab, device=device)
            return empty, no_probs, caps_tensor
        tokens, pads = pending_tokens(rows, device)
        threshold = models.speculation.confidence_threshold
        lengths, going = caps_tensor, caps_tensor > 0
        drafted, probs = [], []
        samplings = [row.request.sampling for row in rows]
        kept = models.draft.kept_ids
        for position in range(planned):
            logits = models.draft.forward(tokens, pads, logits_to_keep=1)[:, -1]
            if greedy:  # one-hot q: the argmax is all we need
                token = draft_greedy_tokens(logits, kept)
            else:
                logits = pad_vocab(logits, models.vocab)
                draft_probs = warp_rows(logits, samplings)
                token = sample(draft_probs, uniforms=uniforms[:, position])
                probs.append(draft_probs)
            drafted.append(token)
            tokens, pads = token.unsqueeze(1), [0] * batch
            if threshold > 0:
                confident = torch.softmax(kept_columns(logits, kept).float(),
                                          dim=-1).amax(dim=-1) >= threshold
                lengths = torch.where(going, torch.full_like(lengths, position + 1), lengths)
                going = going & confident & (lengths < caps_tensor)
                if position + 1 < planned and not bool(going.any()):  # one sync, adaptive only
                    break
        draft_probs = torch.stack(probs, dim=1) if probs else None
        return torch.stack(drafted, dim=1), draft_probs, lengths

    def _verify(self, rows: list[_Row], draft_tokens, draft_probs, lengths, uniforms, greedy):
        """One target pass over ``[pending, x_1..x_g]`` and the acceptance rule; returns the
        outcome, the per-position acceptance sum_v min(p, q) ``[B, g]`` (for alpha) and the
        target's logits (for log-probabilities).

        ``uniforms`` = (acceptance draws ``[B, g]``, final draws ``[B]``).
        """
        models = self.models
        gamma = draft_tokens.shape[1]
        if any(row.target_prefix for row in rows):  # rows joined: prompts and blocks in one pass
            blocks = draft_tokens.tolist()  # a second transfer, on admitting steps only
            logits = models.target.forward_ragged(
                [row.target_prefix + [row.target_pending] + block
                 for row, block in zip(rows, blocks)], keep=gamma + 1)
            for row in rows:
                row.target_prefix = []
        else:
            pending = torch.tensor([[row.target_pending] for row in rows], device=models.device)
            logits = models.target.forward(torch.cat([pending, draft_tokens], dim=1))
        if greedy:  # p and q one-hot: acceptance is argmax equality
            target_tokens = greedy_tokens(logits)
            outcome = verify_greedy(draft_tokens, target_tokens, lengths)
            return outcome, (draft_tokens == target_tokens[:, :gamma]).float(), logits
        samplings = [row.request.sampling for row in rows]
        target_probs = warp_rows(pad_vocab(logits, models.vocab), samplings)
        outcome = verify(
            draft_tokens,
            draft_probs,
            target_probs,
            draft_lengths=lengths,
            lenience=models.speculation.lenience,
            epsilon=models.speculation.epsilon,
            uniforms=uniforms,
        )
        return outcome, analytic_acceptance(target_probs[:, :gamma], draft_probs), logits

    @staticmethod
    def _logprobs(rows: list[_Row], logits, draft_tokens, outcome) -> list:
        """Per row, the target's log-probabilities at each position of the block: x_1..x_n
        then the next token at position n (rows that did not ask: None)."""
        tops = [row.request.logprobs for row in rows]
        if all(top is None for top in tops):
            return tops
        taken = torch.cat([draft_tokens, outcome.next_tokens.unsqueeze(1)], dim=1)
        taken.scatter_(1, outcome.num_accepted.unsqueeze(1), outcome.next_tokens.unsqueeze(1))
        return host_logprobs(logits, taken, tops)

    def _to_host(self, draft_tokens, lengths, outcome, alpha) -> list[tuple]:
        """One device-to-host transfer of the block's results, unpacked per row."""
        gamma = draft_tokens.shape[1]
        # alpha is summed over the verified positions: 1..min(n + 1, length)
        verified = torch.minimum(outcome.num_accepted + 1, lengths)
        positions = torch.arange(gamma, device=self.models.device).unsqueeze(0)
        alpha_sums = (alpha * (positions < verified.unsqueeze(1))).sum(dim=1, dtype=torch.float64)
        columns = [draft_tokens, lengths.unsqueeze(1), outcome.num_accepted.unsqueeze(1),
                   outcome.next_tokens.unsqueeze(1)]
        packed = torch.cat([c.double() for c in columns] + [alpha_sums.unsqueeze(1)], dim=1)
        return [
            ([int(t) for t in row[:gamma]], int(row[gamma]), int(row[gamma + 1]),
             int(row[gamma + 2]), row[gamma + 3])
            for row in packed.tolist()
        ]

    def _rollback(self, host: list[tuple], gamma: int) -> None:
        """Target: drop the g - n rejected slots; draft: x_{n+1}..x_{g-1} (x_g was never fed)."""
        models = self.models
        accepted = [item[2] for item in host]
        models.target.rollback([gamma - n for n in accepted])
        if models.draft is not None and gamma > 0:
            models.draft.rollback([max(gamma - 1 - n, 0) for n in accepted])

"""Decoding metrics as data: counts collected by the engine, every rate derived from them.

Definitions (see docs/metrics.md):
- acceptance_rate   = accepted draft tokens / drafted tokens (vLLM, llama.cpp convention).
- block_efficiency  = tau = new tokens emitted / target decoding calls, bonus included
                      ("mean acceptance length" in vLLM, EAGLE, Spec-Bench). Prefill is not a call.
- analytic_alpha    = mean over verified positions of sum_v min(p, q) = 1 - TVD(p, q). A position
                      is verified when its prefix was accepted: positions 1..min(n+1, gamma).
- per_position_acceptance[i] = fraction of blocks whose token i+1 was accepted, among blocks that
                      drafted at least i+1 tokens (unconditional, vLLM's convention).
- accepted_length_histogram[n] = number of blocks that accepted exactly n draft tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DecodeCounts:
    """Raw counts for one row (or a sum over rows). Derived metrics are properties."""

    gamma: int = 0
    new_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    alpha_sum: float = 0.0
    alpha_positions: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    position_drafted: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)
    # Prompt lookup blocks (lookup_step.py): tokens copied from the context, not the draft's,
    # so they stay out of the draft's acceptance figures above.
    lookup_blocks: int = 0
    lookup_proposed: int = 0
    lookup_accepted: int = 0

    def __post_init__(self) -> None:
        if not self.position_drafted:
            self.position_drafted = [0] * self.gamma
            self.position_accepted = [0] * self.gamma

    def record_block(
        self, drafted: int, accepted: int, alpha_sum: float, alpha_positions: int
    ) -> None:
        """One verified block: ``drafted`` tokens proposed, the first ``accepted`` kept."""
        self.target_calls += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.accepted_lengths.append(accepted)
        self.alpha_sum += alpha_sum
        self.alpha_positions += alpha_positions
        if drafted > self.gamma:  # a row admitted with no draft, then given one (replace_draft)
            self.position_drafted += [0] * (drafted - self.gamma)
            self.position_accepted += [0] * (drafted - self.gamma)
            self.gamma = drafted
        for position in range(drafted):
            self.position_drafted[position] += 1
            self.position_accepted[position] += int(position < accepted)

    def record_lookup(self, proposed: int, accepted: int) -> None:
        """One verified prompt lookup block: ``proposed`` copied tokens, the first ``accepted``
        kept."""
        self.target_calls += 1
        self.lookup_blocks += 1
        self.lookup_proposed += proposed
        self.lookup_accepted += accepted

    def __add__(self, other: DecodeCounts) -> DecodeCounts:
        gamma = max(self.gamma, other.gamma)
        pad = lambda xs: xs + [0] * (gamma - len(xs))  # noqa: E731
        return DecodeCounts(
            gamma=gamma,
            new_tokens=self.new_tokens + other.new_tokens,
            drafted_tokens=self.drafted_tokens + other.drafted_tokens,
            accepted_tokens=self.accepted_tokens + other.accepted_tokens,
            target_calls=self.target_calls + other.target_calls,
            draft_calls=self.draft_calls + other.draft_calls,
            alpha_sum=self.alpha_sum + other.alpha_sum,
            alpha_positions=self.alpha_positions + other.alpha_positions,
            accepted_lengths=self.accepted_lengths + other.accepted_lengths,
            position_drafted=[
                a + b for a, b in zip(pad(self.position_drafted), pad(other.position_drafted))
            ],
            position_accepted=[
                a + b for a, b in zip(pad(self.position_accepted), pad(other.position_accepted))
            ],
            lookup_blocks=self.lookup_blocks + other.lookup_blocks,
            lookup_proposed=self.lookup_proposed + other.lookup_proposed,
            lookup_accepted=self.lookup_accepted + other.lookup_accepted,
        )

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def block_efficiency(self) -> float | None:
        return self.new_tokens / self.target_calls if self.target_calls else None

    @property
    def analytic_alpha(self) -> float | None:
        return self.alpha_sum / self.alpha_positions if self.alpha_positions else None

    @property
    def per_position_acceptance(self) -> list[float | None]:
        return [a / d if d else None for a, d in zip(self.position_accepted, self.position_drafted)]

    @property
    def accepted_length_histogram(self) -> list[int]:
        histogram = [0] * (self.gamma + 1)
        for length in self.accepted_lengths:
            histogram[length] += 1
        return histogram

    def to_dict(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "block_efficiency": self.block_efficiency,
            "analytic_alpha": self.analytic_alpha,
            "per_position_acceptance": self.per_position_acceptance,
            "accepted_length_histogram": self.accepted_length_histogram,
            "target_calls": self.target_calls,
            "draft_calls": self.draft_calls,
            "lookup_blocks": self.lookup_blocks,
            "lookup_proposed": self.lookup_proposed,
            "lookup_accepted": self.lookup_accepted,
        }


@dataclass
class GenerationMetrics:
    """Per-row counts, the batch's real forward passes and the wall-clock split.

    The rates of the summed counts are available directly (``metrics.acceptance_rate``,
    ``.block_efficiency``, ``.analytic_alpha``...); ``metrics.rows[i]`` has them per row.
    """

    rows: list[DecodeCounts]
    finish_reasons: list[str]
    target_forward_passes: int = 0  # batched calls, prefill included
    draft_forward_passes: int = 0
    prefill_passes: int = 0  # admissions that ran a prefill call (of either model)
    # Per model, the prefill calls among its forward passes. They differ where rows joining a
    # chain step read their prompts in its target pass (a ragged call, no target prefill).
    target_prefill_passes: int = 0
    draft_prefill_passes: int = 0
    wall_time_s: float = 0.0
    draft_time_s: float = 0.0
    target_time_s: float = 0.0  # verify (and plain decoding) calls
    prefill_time_s: float = 0.0  # both models' prefill calls (a ragged join's prompt: target_time_s)

    @property
    def total(self) -> DecodeCounts:
        total = DecodeCounts(gamma=max((r.gamma for r in self.rows), default=0))
        for row in self.rows:
            total = total + row
        return total

    def __getattr__(self, name: str) -> Any:
        # acceptance_rate, block_efficiency, analytic_alpha, new_tokens, ... of the summed counts
        if name in _TOTAL_FIELDS:
            return getattr(self.total, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def tokens_per_second(self) -> float | None:
        return self.total.new_tokens / self.wall_time_s if self.wall_time_s > 0 else None

    def row_dict(self, index: int) -> dict[str, Any]:
        return {**self.rows[index].to_dict(), "finish_reason": self.finish_reasons[index]}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.total.to_dict(),
            "batch_size": len(self.rows),
            "target_forward_passes": self.target_forward_passes,
            "draft_forward_passes": self.draft_forward_passes,
            "prefill_passes": self.prefill_passes,
            "target_prefill_passes": self.target_prefill_passes,
            "draft_prefill_passes": self.draft_prefill_passes,
            "wall_time_s": self.wall_time_s,
            "draft_time_s": self.draft_time_s,
            "target_time_s": self.target_time_s,
            "prefill_time_s": self.prefill_time_s,
            "tokens_per_second": self.tokens_per_second,
        }

    def summary(self) -> str:
        """One line for humans."""
        total = self.total
        parts = [f"{total.new_tokens} tokens in {self.wall_time_s:.2f}s"]
        if self.tokens_per_second:
            parts.append(f"{self.tokens_per_second:.1f} tok/s")
        if total.drafted_tokens:
            parts += [
                f"acceptance {total.acceptance_rate:.3f}",
                f"alpha {total.analytic_alpha:.3f}",
                f"tau {total.block_efficiency:.2f}",
                f"draft {self.draft_time_s:.2f}s / target {self.target_time_s:.2f}s",
            ]
        if total.lookup_blocks:
            parts.append(f"lookup {total.lookup_accepted}/{total.lookup_proposed} copied tokens "
                         f"kept in {total.lookup_blocks} blocks")
            if not total.drafted_tokens:
                parts.append(f"tau {total.block_efficiency:.2f}")
        return " | ".join(parts)


_TOTAL_FIELDS = {
    "acceptance_rate",
    "block_efficiency",
    "analytic_alpha",
    "per_position_acceptance",
    "accepted_length_histogram",
    "new_tokens",
    "drafted_tokens",
    "accepted_tokens",
    "target_calls",
    "draft_calls",
}


def combined_counts(results) -> DecodeCounts:
    """The summed counts of several generation results (e.g. one per batch of prompts)."""
    total = DecodeCounts()
    for result in results:
        total = total + result.metrics.total
    return total


def expected_tokens_per_block(alpha: float, gamma: int) -> float:
    """E[tokens per target call] with per-token acceptance alpha: (1 - alpha^(g+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def predicted_speedup(
    alpha: float, gamma: int, cost_ratio: float, verify_cost: float = 1.0
) -> float:
    """Leviathan et al. Thm 3.8 with a verify cost: E[tokens/block] / (gamma c + V(gamma+1)).

    ``cost_ratio`` c = draft step time / target step time; ``verify_cost`` V(gamma+1) = time of
    one target call over gamma+1 tokens / a one-token step (1 in the paper's model; measured by
    ``decoding.measure.CostModel``). alpha = 1 gives (gamma+1) / (gamma c + V).
    """
    return expected_tokens_per_block(alpha, gamma) / (gamma * cost_ratio + verify_cost)


def predicted_tree_speedup(
    tokens_per_block: float, draft_calls: int, cost_ratio: float, verify_cost: float
) -> float:
    """A tree block's speed-up: tau / (draft_calls c + V(nodes + 1)).

    A tree has no closed-form tau (it depends on how often the target's token is the draft's
    2nd, 3rd, ... choice), so tau is the measured tokens per block; ``draft_calls`` is the tree's
    depth (one draft call per level), ``verify_cost`` V(nodes + 1) the measured verify curve."""
    return tokens_per_block / (draft_calls * cost_ratio + verify_cost)


def describe_round_speedups(row: dict[str, Any]) -> str:
    """A sweep row's per-round speed-ups (``SweepRow.speedup_rounds``) as
    '1.12× (1.05–1.31)': their median, then the lowest and highest; '–' for a report written
    before they were recorded."""
    rounds = row.get("speedup_rounds")
    if not rounds:
        return "–"
    return f"{row['speedup_round_median']:.2f}× ({min(rounds):.2f}–{max(rounds):.2f})"


def describe_agreement(agreement: dict[str, Any] | None) -> str:
    """A ``quality.Agreement.to_dict()`` as '100%' or '75% (first difference at 21.0)' (where
    the differing rows first differ); '–' for None (sampled rows have no agreement figure)."""
    if not agreement:
        return "–"
    cell = f"{agreement['exact_match']:.0%}"
    if agreement["first_difference_where_different"] is not None:
        cell += f" (first difference at {agreement['first_difference_where_different']:.1f})"
    return cell

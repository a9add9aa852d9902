"""Task-quality metrics as pure functions (no torch, no model): what ``distillspec eval`` reports
beside speed. Definitions (see docs/eval.md):

* ``pass_at_k(n, c, k)``: the unbiased estimator of Chen et al. 2021 (HumanEval), the chance
  that at least one of k samples drawn without replacement from n generated samples, c of them
  correct, passes: 1 - C(n - c, k) / C(n, k), computed as a stable product. Higher is better.
* ``first_difference(output, reference)``: the 0-based position of the first token where the
  two differ, i.e. the length of their common prefix; identical sequences give their length,
  and a sequence that is a proper prefix of the other differs at its own end.
* ``agreement(outputs, references)``: exact agreement of each output with its reference (the
  target's own greedy answer): the fraction of rows identical token for token, and the mean
  first difference (in tokens, and as a fraction of the reference's length; over the rows that
  differ, where they first differ). Higher is closer.
* ``mean_per_token(values)``: a mean over rows of per-row means (each row's tokens averaged
  first, then the rows: the paper's reduction); rows without tokens are skipped.
* ``paired_difference(values, baselines)``: the mean of values_i - baselines_i over rows scored
  on the same items (same prompts and seeds), with a 95 % interval for it (normal
  approximation: mean ± 1.96 · s / √n, s the differences' sample standard deviation). Pairing
  removes the spread between items, which dominates pass@1 on a few dozen problems.
* ``truncate_at_stops(text, stops)``: the text before the earliest stop sequence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased pass@k for one problem: n samples, c correct, k drawn.

    1 - C(n-c, k) / C(n, k) = 1 - prod_{i = n-c+1..n} (1 - k / i); 1.0 when n - c < k (every
    draw of k samples holds a correct one)."""
    if not (_is_count(n) and _is_count(c) and _is_count(k)):
        raise ValueError(f"pass_at_k needs integers n, c, k >= 0; got n={n!r}, c={c!r}, k={k!r}.")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass@{k} needs 1 <= k <= n (the samples per problem), got n={n}. Generate at "
            f"least {k} samples per problem, or ask for a smaller k."
        )
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct samples out of n={n} is impossible.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct_per_problem: Sequence[tuple[int, int]], k: int) -> float:
    """The mean of ``pass_at_k`` over problems, each given as (n samples, c correct)."""
    if not correct_per_problem:
        raise ValueError("mean_pass_at_k needs at least one problem.")
    values = [pass_at_k(n, c, k) for n, c in correct_per_problem]
    return sum(values) / len(values)


def first_difference(output: Sequence[int], reference: Sequence[int]) -> int:
    """The length of the common prefix (the position of the first differing token)."""
    position = 0
    for ours, theirs in zip(output, reference):
        if ours != theirs:
            break
        position += 1
    return position


@dataclass(frozen=True)
class Agreement:
    """How closely outputs reproduce their references (the target's greedy answers)."""

    rows: int
    exact_match: float  # fraction of rows identical token for token
    mean_first_difference: float  # tokens of common prefix, averaged over rows
    mean_prefix_fraction: float  # common prefix / reference length, averaged over rows
    # Where the rows that differ first differ, averaged over those rows (None: none differs).
    first_difference_where_different: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"rows": self.rows, "exact_match": self.exact_match,
                "mean_first_difference": self.mean_first_difference,
                "mean_prefix_fraction": self.mean_prefix_fraction,
                "first_difference_where_different": self.first_difference_where_different}


def agreement(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> Agreement:
    """Exact agreement of ``outputs[i]`` with ``references[i]`` (see the module docstring).

    An empty reference counts a prefix fraction of 1 when the output is empty too, else 0."""
    if len(outputs) != len(references):
        raise ValueError(f"agreement: {len(outputs)} outputs but {len(references)} references.")
    if not outputs:
        raise ValueError("agreement needs at least one row.")
    same = prefix = fraction = 0.0
    differing: list[int] = []
    for output, reference in zip(outputs, references):
        common = first_difference(output, reference)
        identical = list(output) == list(reference)
        same += identical
        prefix += common
        fraction += common / len(reference) if reference else float(not output)
        if not identical:
            differing.append(common)
    rows = len(outputs)
    where = sum(differing) / len(differing) if differing else None
    return Agreement(rows, same / rows, prefix / rows, fraction / rows, where)


def mean_per_token(per_row: Iterable[Sequence[float]]) -> float | None:
    """Mean over rows of each row's mean value; rows without values are skipped (None if none)."""
    means = [sum(row) / len(row) for row in per_row if len(row)]
    return sum(means) / len(means) if means else None


@dataclass(frozen=True)
class PairedDifference:
    """mean_i (values_i - baselines_i) over ``rows`` pairs, with its 95 % interval (None with
    fewer than 2 pairs: no spread to estimate)."""

    rows: int
    mean: float
    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"rows": self.rows, "mean": self.mean, "low": self.low, "high": self.high}


def paired_difference(values: Sequence[float], baselines: Sequence[float],
                      z: float = 1.96) -> PairedDifference:
    """values - baselines, row by row (a positive mean: values higher), and mean ± z · s / √n,
    s = sqrt(sum_i (d_i - mean)^2 / (n - 1)). Normal approximation: read it as a guide at small
    n, not a test."""
    if len(values) != len(baselines):
        raise ValueError(f"paired_difference: {len(values)} values but {len(baselines)} "
                         "baselines; pair each row with its baseline on the same item.")
    if not values:
        raise ValueError("paired_difference needs at least one pair.")
    differences = [value - base for value, base in zip(values, baselines)]
    rows = len(differences)
    mean = sum(differences) / rows
    if rows < 2:
        return PairedDifference(rows, mean, None, None)
    spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / (rows - 1))
    half = z * spread / math.sqrt(rows)
    return PairedDifference(rows, mean, mean - half, mean + half)


def truncate_at_stops(text: str, stops: Iterable[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for stop in stops:
        if not stop:
            raise ValueError("Stop sequences must not be empty.")
        found = text.find(stop)
        if found != -1:
            cut = min(cut, found)
    return text[:cut]

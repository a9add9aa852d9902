"""When speculation pays: pick each step's draft length from measured throughput.

SD trades one target pass per token for ``gamma`` draft passes plus one wider target pass per
block. At batch 1 on a memory-bound device the wider pass costs little more than one token's, so
SD wins; as the batch grows the target pass becomes compute-bound, its cost grows with the
width, and at some batch size plain decoding produces more tokens per second (vLLM turns
speculation off above a fixed batch size for the same reason). Where that size lies depends on
the device, the dtype, the draft's cost and its acceptance, all of which a server only knows by
measuring, so the measured cost model here is the measurement itself:

* the arms are draft-length limits: ``None`` (speculate as configured: gamma or the tree),
  ``1`` (a chain of one draft token) and ``0`` (plain decoding, the draft kept in sync);
* for each batch-size bucket (1, 2, 3-4, 5-8, ...) and arm it keeps an exponential moving
  average of the tokens per second of the steps it ran (emitted tokens of all rows / the step's
  wall seconds);
* ``choose`` runs every arm ``warmup`` times in a bucket first (the configured one first), then
  the arm with the highest average; every ``explore_every``-th step of a bucket it runs the
  arm measured longest ago instead, so an estimate that went stale (a new draft, a busy
  machine) is refreshed at a bounded cost of about 1/explore_every of the steps;
* a new draft (``forget_speculative``) clears the speculative arms' averages: its acceptance
  is another.

Pure host logic, no tensors and no clock: the caller times each step and reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PLAIN = 0  # the arm that drafts nothing
POLICIES = ("auto", "always")


def bucket(batch: int) -> int:
    """The batch-size bucket: the next power of two at or above ``batch`` (1, 2, 4, 8, ...)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}.")
    return 1 << (batch - 1).bit_length()


def arm_name(arm: int | None) -> str:
    """``None`` -> "speculate", ``0`` -> "plain", ``k`` -> "gamma<k>" (labels in /metrics)."""
    return "speculate" if arm is None else "plain" if arm == PLAIN else f"gamma{arm}"


@dataclass
class _Estimate:
    tokens_per_second: float = 0.0
    samples: int = 0
    last_step: int = -1  # the bucket's step count when it was last measured


@dataclass
class _Bucket:
    steps: int = 0
    estimates: dict = field(default_factory=dict)  # arm -> _Estimate


class ModePolicy:
    """Per step and batch size, the draft-length limit that has produced the most tokens/s.

    ``arms``: the limits to choose among, the configured one first (e.g. ``[None, 1, 0]``).
    ``smoothing``: weight of the newest measurement in the moving average (0 < s <= 1).
    """

    def __init__(self, arms: list[int | None], *, warmup: int = 2, explore_every: int = 32,
                 smoothing: float = 0.25):
        if not arms or len(set(arms)) != len(arms):
            raise ValueError(f"arms must be distinct and non-empty, got {arms}.")
        if warmup < 1 or explore_every < 2 or not 0 < smoothing <= 1:
            raise ValueError(
                f"need warmup >= 1, explore_every >= 2 and 0 < smoothing <= 1; got {warmup}, "
                f"{explore_every}, {smoothing}."
            )
        self.arms = list(arms)
        self.warmup, self.explore_every, self.smoothing = warmup, explore_every, smoothing
        self.buckets: dict[int, _Bucket] = {}

    @classmethod
    def for_speculation(cls, gamma: int, tree: bool, **options) -> ModePolicy:
        """The arms for a configured speculation: as configured, a 1-token chain (unless that
        is the configuration), plain."""
        arms: list[int | None] = [None]
        if tree or gamma > 1:
            arms.append(1)
        return cls(arms + [PLAIN], **options)

    def choose(self, batch: int) -> int | None:
        """The arm to run for a step of ``batch`` live rows."""
        state = self.buckets.setdefault(bucket(batch), _Bucket())
        estimates = [state.estimates.get(arm, _Estimate()) for arm in self.arms]
        for arm, estimate in zip(self.arms, estimates):
            if estimate.samples < self.warmup:
                return arm
        best = max(zip(self.arms, estimates), key=lambda pair: pair[1].tokens_per_second)[0]
        if (state.steps + 1) % self.explore_every == 0:
            stalest = min(zip(self.arms, estimates), key=lambda pair: pair[1].last_step)[0]
            return stalest
        return best

    def record(self, batch: int, arm: int | None, tokens: int, seconds: float) -> None:
        """A step of ``batch`` rows ran ``arm`` and emitted ``tokens`` in ``seconds``."""
        if arm not in self.arms or seconds <= 0:
            return
        state = self.buckets.setdefault(bucket(batch), _Bucket())
        state.steps += 1
        estimate = state.estimates.setdefault(arm, _Estimate())
        rate = tokens / seconds
        weight = 1.0 if estimate.samples == 0 else self.smoothing
        estimate.tokens_per_second += weight * (rate - estimate.tokens_per_second)
        estimate.samples += 1
        estimate.last_step = state.steps

    def rate(self, batch: int, arm: int | None) -> float | None:
        """The current tokens/s estimate of ``arm`` at this batch's bucket (None: unmeasured)."""
        estimate = self.buckets.get(bucket(batch), _Bucket()).estimates.get(arm)
        return None if estimate is None else estimate.tokens_per_second

    def forget_speculative(self) -> None:
        """A new draft: every drafting arm's estimate is stale (plain's still holds)."""
        for state in self.buckets.values():
            for arm in [a for a in state.estimates if a != PLAIN]:
                del state.estimates[arm]

    def estimates(self) -> dict[tuple[int, str], float]:
        """(bucket, arm name) -> the current tokens/s estimate, for /metrics."""
        return {
            (size, arm_name(arm)): estimate.tokens_per_second
            for size, state in sorted(self.buckets.items())
            for arm, estimate in state.estimates.items()
        }

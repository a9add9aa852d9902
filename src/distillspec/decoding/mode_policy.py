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
* for each batch-size bucket (1, 2, 3-4, 5-8, ...) and arm it keeps an estimate of the tokens
  per second *per running row* of the steps it ran: the ratio of decayed sums, emitted tokens
  per row over wall seconds (each step's weight decays by 1 - 1/memory per newer step of the
  same arm), so a slow step counts by its length and one hiccup of the machine moves the
  estimate by ~1/memory. Per row, because a bucket spans batch sizes up to 2x apart: a total
  tokens/s measured at 16 rows beats any arm measured at 9, and the server's loop replayed at
  16 clients (docs/results/serve-policy-avx2) spent a third to three fifths of its steps on a
  chain no faster per row than plain that way (its estimate came from full batches, 141 tok/s;
  plain's from the batch draining, 107 at 11 rows); a row's rate moves far less with the batch;
* compared **at one batch size**: a row's rate still falls as the batch grows within a bucket
  (served at 16 clients on the 2-core Xeon, a plain step took 51 ms at 9 rows and 58 ms at
  16), and the arms need not meet the same batches (a chain's rows end out of step, so more of
  its steps run on the batches left after rows ended): an arm measured at 9 rows would look
  13 % faster per row than plain measured at 16, more than the margin. So each arm's rate is
  scaled by plain's step seconds at the arm's mean batch, from a line fitted through the
  bucket's plain steps (``_PlainCost``): tokens per row per plain step at the arm's own batch
  size (docs/results/serve-chain-joins);
* ``choose`` runs every arm ``warmup`` times in a bucket first (the configured one first), then
  the arm with the highest optimistic estimate, the rate plus ``confidence`` standard errors of
  its per-step rates (an upper confidence bound, as in UCB bandits): an arm that trails only
  within its noise is tried again soon, one far behind hardly ever. Every
  ``explore_every``-th step of a bucket it runs the arm measured longest ago instead, so an
  estimate that went stale (a new draft, a busy machine) is refreshed at a bounded cost.
  (Thinning these re-measurements while the leader holds, 32 then 64, 128, 256 steps, kept
  0.4-1 point more of the best arm in the simulation below, but served at 1 client, where
  speculation led plain by only 0-12 % under HTTP load, it left the server on plain for about
  2/3 of the steps after one noisy lead change: each rare re-measurement of speculation also
  paid the draft's catch-up. Not kept. The server now records no step that catches the draft
  up, so a re-measurement after plain steps is the second drafting step, not the first);
* a bucket **settles on plain** once every drafting arm has run ``settle`` steps there and
  none can plausibly beat plain by the margin below: the best one's rate plus two standard
  errors, divided by ``1 + margin``, stays below plain's. It then runs plain, re-measuring the
  arm measured longest ago only every ``settled_explore_every``-th step (256, not 32), and so
  does every larger bucket, without warming its drafting arms up (a wider batch only makes the
  verify more compute-bound: vLLM disables speculation above a batch size for that reason,
  here the size is measured). Why: at 16 clients on the 2-core CPU the drafting arms ran
  0.70-0.84x plain per row, and the server's loop replayed (docs/results/serve-settle) spent
  4 % of its steps at 9-16 rows drafting to re-measure them, each of which also caught the
  draft up and left the rows' ends out of step, so that their successors were admitted one by
  one (29 admission steps against plain's 15);
* speculation must beat plain by ``margin`` (0.1 by default) per step: a drafting arm's
  estimate is divided by ``1 + margin`` wherever it is compared with plain's (choosing and
  settling). Why: speculating has costs no step's timer sees. Rows accept different numbers
  of tokens, so they end out of step and their successors are admitted one or two at a time
  (twice plain's admission steps at 16 clients, docs/results/serve-buckets), a round's last
  rows drain a shrinking batch, and a re-measurement after plain steps first catches the draft
  up. At 16 clients on the 2-core CPU the 1-token chain measured 0.97x plain per step and was
  chosen on 617 of 778 steps, and the server ran 0.75x the target alone; with a 0.1 margin,
  plain on 94 % of the steps, 0.81x in the same run, and 0.93x in the next with the
  settling rule above (a margin-0 server beside it, still choosing the chain, measured 0.92x
  there: the rule's own share is inside the run-to-run spread; before, a bucket settled only
  when the best drafting arm's upper bound fell below 0.9x plain's, so a near-tie was
  re-measured every 32nd step for ever), while 1 and 4 clients kept speculating, 1.44x and
  1.11x (docs/results/serve-margin);
* a new draft (``forget_speculative``) clears the speculative arms' estimates: its acceptance
  is another (and no bucket is settled until they are measured again).

Why not a moving average of per-step rates (the first version): with weight 0.25 per step, a
noisy step (random acceptances move a 4-row step's rate by ~18 %) could push the faster arm
below plain, which then held for the ~32 steps until the next re-measurement; a served run
spent 276 of 453 steps on plain while the 1-token chain measured 1.15x faster
(docs/results/serve-anatomy). In a seeded simulation of that regime (``tests/test_mode_policy``)
this estimator keeps 0.94-0.95 of the best arm's throughput where the old one kept
0.93-0.94, and never less.

Pure host logic, no tensors and no clock: the caller times each step and reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PLAIN = 0  # the arm that drafts nothing
POLICIES = ("auto", "always")
# Speculation's costs that no step's timer sees (rows ending out of step, drains, catch-ups):
# a drafting arm must beat plain per step by this share to be chosen.
PLAIN_MARGIN = 0.1


def check_margin(margin: float, name: str = "margin") -> None:
    """Refuse a margin outside [0, 10] (a share of plain's rate), saying which knob."""
    if not 0 <= margin <= 10:
        raise ValueError(f"{name} must be in [0, 10] (the share by which speculation must beat "
                         f"plain decoding per step), got {margin}.")


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
    """Decayed sums of one arm's steps in one bucket (each older step weighs ``decay`` less)."""

    tokens: float = 0.0
    seconds: float = 0.0
    weight: float = 0.0  # decayed step count: the effective number of samples
    rate_sum: float = 0.0  # per-step rates, for their spread
    rate_squares: float = 0.0
    samples: int = 0
    last_step: int = -1  # the bucket's step count when it was last measured
    batch_sum: float = 0.0  # decayed sum of the steps' batch sizes

    def add(self, tokens: float, seconds: float, decay: float, batch: int = 1) -> None:
        """One step of ``batch`` rows: ``tokens`` emitted per row in ``seconds``."""
        rate = tokens / seconds
        self.tokens = decay * self.tokens + tokens
        self.seconds = decay * self.seconds + seconds
        self.weight = decay * self.weight + 1.0
        self.batch_sum = decay * self.batch_sum + batch
        self.rate_sum = decay * self.rate_sum + rate
        self.rate_squares = decay * self.rate_squares + rate * rate
        self.samples += 1

    @property
    def tokens_per_second(self) -> float:
        """Emitted tokens per row over wall seconds, both decayed: the arm's throughput per
        row."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def upper_bound(self, confidence: float) -> float:
        """The throughput per row plus ``confidence`` standard errors of the per-step rates."""
        if self.weight <= 0:
            return 0.0
        mean_rate = self.rate_sum / self.weight
        variance = max(self.rate_squares / self.weight - mean_rate * mean_rate, 0.0)
        return self.tokens_per_second + confidence * (variance / self.weight) ** 0.5

    @property
    def mean_batch(self) -> float:
        """The batch size its steps ran at, on average (decayed like the rate)."""
        return self.batch_sum / self.weight if self.weight > 0 else 0.0


@dataclass
class _PlainCost:
    """Plain step seconds against the batch size within a bucket, t(n) = a + b n: a decayed
    least-squares line through the plain steps (b >= 0; flat while they ran at one size)."""

    weight: float = 0.0
    batch: float = 0.0  # decayed sums of n, t, n^2 and n t
    seconds: float = 0.0
    batch_squares: float = 0.0
    batch_seconds: float = 0.0
    smallest: int = 0  # the batch sizes plain has run at: the line is not extrapolated
    largest: int = 0

    def add(self, batch: int, seconds: float, decay: float) -> None:
        self.smallest = min(self.smallest or batch, batch)
        self.largest = max(self.largest, batch)
        self.weight = decay * self.weight + 1.0
        self.batch = decay * self.batch + batch
        self.seconds = decay * self.seconds + seconds
        self.batch_squares = decay * self.batch_squares + batch * batch
        self.batch_seconds = decay * self.batch_seconds + batch * seconds

    def at(self, batch: float) -> float | None:
        """The fitted plain step seconds at ``batch`` rows, held within the sizes plain ran at
        (a noisy slope is not carried beyond them; None: no plain step yet)."""
        if self.weight <= 0:
            return None
        batch = min(max(batch, self.smallest), self.largest)
        mean_batch, mean_seconds = self.batch / self.weight, self.seconds / self.weight
        spread = self.batch_squares / self.weight - mean_batch * mean_batch
        slope = 0.0
        if spread > 0.05:  # not (nearly) all at one size: a slope to fit
            slope = max((self.batch_seconds / self.weight - mean_batch * mean_seconds) / spread,
                        0.0)
        return max(mean_seconds + slope * (batch - mean_batch), 0.25 * mean_seconds)


@dataclass
class _Bucket:
    steps: int = 0
    estimates: dict = field(default_factory=dict)  # arm -> _Estimate
    plain_cost: _PlainCost = field(default_factory=_PlainCost)

    def batch_factor(self, estimate: _Estimate) -> float:
        """What turns an arm's per-row rate into one comparable across the batch sizes of the
        bucket (the module's "at one batch size"): plain's fitted step seconds at the arm's
        mean batch, so rate x t_plain(mean batch) is tokens per row per plain step at the arm's
        own batch (1 before any plain step)."""
        seconds = self.plain_cost.at(estimate.mean_batch)
        return 1.0 if seconds is None else seconds


class ModePolicy:
    """Per step and batch size, the draft-length limit that has produced the most tokens/s
    per row.

    ``arms``: the limits to choose among, the configured one first (e.g. ``[None, 1, 0]``).
    ``memory``: steps of an arm after which a step's weight has decayed by 1/e (decay 1 - 1/memory).
    ``confidence``: standard errors of optimism when choosing (0: the plain estimate).
    ``margin``: the share by which a drafting arm must beat plain (its estimates are divided by
    ``1 + margin`` against plain's).
    """

    def __init__(self, arms: list[int | None], *, warmup: int = 2, explore_every: int = 32,
                 memory: float = 32.0, confidence: float = 1.0, settle: int = 4,
                 settled_explore_every: int = 256, margin: float = PLAIN_MARGIN):
        if not arms or len(set(arms)) != len(arms):
            raise ValueError(f"arms must be distinct and non-empty, got {arms}.")
        if (warmup < 1 or explore_every < 2 or memory < 1 or confidence < 0 or settle < 0
                or settled_explore_every < 2):
            raise ValueError(
                f"need warmup >= 1, explore_every >= 2, memory >= 1, confidence >= 0, settle >= "
                f"0 and settled_explore_every >= 2; got {warmup}, {explore_every}, {memory}, "
                f"{confidence}, {settle}, {settled_explore_every}."
            )
        check_margin(margin)
        self.arms = list(arms)
        self.warmup, self.explore_every = warmup, explore_every
        self.decay, self.confidence = 1.0 - 1.0 / memory, confidence
        self.settle, self.settled_explore_every = settle, settled_explore_every
        self.margin = margin
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
        size = bucket(batch)
        state = self.buckets.setdefault(size, _Bucket())
        estimates = [state.estimates.get(arm, _Estimate()) for arm in self.arms]
        oldest = min(zip(self.arms, estimates), key=lambda pair: pair[1].last_step)[0]
        if self.settled(size):  # never without a plain arm: nothing to settle on
            return oldest if (state.steps + 1) % self.settled_explore_every == 0 else PLAIN
        for arm, estimate in zip(self.arms, estimates):
            if estimate.samples < self.warmup:
                return arm
        if (state.steps + 1) % self.explore_every == 0:
            return oldest
        return max(zip(self.arms, estimates),
                   key=lambda pair: pair[1].upper_bound(self.confidence)
                   * state.batch_factor(pair[1])
                   / (1.0 if pair[0] == PLAIN else 1.0 + self.margin))[0]

    def settled(self, size: int) -> bool:
        """Whether the bucket ``size`` or a smaller one has settled on plain."""
        smallest = self._smallest_settled()
        return 0 < smallest <= size

    def plain_from(self) -> int:
        """The smallest batch size whose bucket has settled on plain (0: none), for /metrics."""
        smallest = self._smallest_settled()
        return smallest // 2 + 1 if smallest else 0

    def _smallest_settled(self) -> int:
        """The smallest bucket where plain leads every drafting arm far (0: none; always 0 with
        ``settle`` 0)."""
        if self.settle == 0:
            return 0
        return min((size for size, state in self.buckets.items() if self._plain_leads(state)),
                   default=0)

    def _plain_leads(self, state: _Bucket) -> bool:
        """Every drafting arm ran ``settle`` steps here and the best one's rate plus two
        standard errors, over ``1 + margin``, is below plain's."""
        plain = state.estimates.get(PLAIN)
        drafting = [state.estimates.get(arm) for arm in self.arms if arm != PLAIN]
        if plain is None or any(e is None or e.samples < self.settle for e in drafting):
            return False
        best = max(e.upper_bound(2 * self.confidence) * state.batch_factor(e)
                   for e in drafting) / (1.0 + self.margin)
        return (plain.samples >= self.settle
                and best < plain.tokens_per_second * state.batch_factor(plain))

    def record(self, batch: int, arm: int | None, tokens: int, seconds: float) -> None:
        """A step of ``batch`` rows ran ``arm`` and emitted ``tokens`` (all rows') in
        ``seconds``."""
        if arm not in self.arms or seconds <= 0:
            return
        state = self.buckets.setdefault(bucket(batch), _Bucket())
        state.steps += 1
        estimate = state.estimates.setdefault(arm, _Estimate())
        estimate.add(tokens / batch, seconds, self.decay, batch)
        estimate.last_step = state.steps
        if arm == PLAIN:  # the line needs many plain steps: a memory 8x the arms'
            state.plain_cost.add(batch, seconds, 1.0 - (1.0 - self.decay) / 8)

    def rate(self, batch: int, arm: int | None) -> float | None:
        """The current tokens/s per row estimate of ``arm`` at this batch's bucket (None:
        unmeasured)."""
        estimate = self.buckets.get(bucket(batch), _Bucket()).estimates.get(arm)
        return None if estimate is None else estimate.tokens_per_second

    def forget_speculative(self) -> None:
        """A new draft: every drafting arm's estimate is stale (plain's still holds)."""
        for state in self.buckets.values():
            for arm in [a for a in state.estimates if a != PLAIN]:
                del state.estimates[arm]

    def estimates(self) -> dict[tuple[int, str], float]:
        """(bucket, arm name) -> the current tokens/s per row estimate, for /metrics."""
        return {
            (size, arm_name(arm)): estimate.tokens_per_second
            for size, state in sorted(self.buckets.items())
            for arm, estimate in state.estimates.items()
        }

"""Measuring speculative decoding: one probe, one gamma sweep, one cost model.

Every speed figure the bench, the demo and ``benchmarks/`` report comes from here:

* ``SpeedProbe`` decodes a fixed prompt set (batches of token ids) with the target alone or
  with SD, through the engine, timed with the one synchronised timer.
* ``SpeedProbe.sweep`` warms up, then times each setting ``repeats`` times with the target-alone
  run interleaved (so drift hits both), and returns typed ``SweepRow``s: tokens/s, tau, alpha,
  acceptance, the measured cost ratio c, the predicted speed-up from the cost model and
  measured / predicted; greedy rows also how often SD's output equals the target alone's.
* ``CostModel`` is measured on the machine: one draft step, one target step, and the verify
  curve V(k) = time of a k-token target call / one-token step. The predicted speed-up is
  E[tokens per block] / (gamma c + V(gamma + 1)).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from distillspec.decoding.acceptance import verify
from distillspec.decoding.batching import left_pad
from distillspec.decoding.generate import (
    GenerationResult,
    autoregressive_generate,
    speculative_generate,
)
from distillspec.decoding.kv_cache import CachedModel, compile_steps, steps_compiled
from distillspec.decoding.metrics import (
    combined_counts,
    predicted_speedup,
    predicted_tree_speedup,
)
from distillspec.decoding.packed_linear import warm_choices
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.quality import agreement
from distillspec.decoding.sampling import sample, warp
from distillspec.decoding.timing import interleaved_medians, timed
from distillspec.decoding.tree import Tree


@dataclass
class CostModel:
    """Step costs measured on this machine (seconds) and the ratios the speed-up model uses."""

    target_step_s: float
    draft_step_s: float
    verify_s: dict[int, float]  # tokens scored in one target call -> seconds
    context_tokens: int = 0

    @property
    def cost_ratio(self) -> float:
        """c = one draft step / one target step."""
        return self.draft_step_s / self.target_step_s

    def verify_cost(self, tokens: int) -> float:
        """V(k) = a k-token target call / a one-token step (interpolated, clamped at the ends)."""
        if tokens in self.verify_s:
            return self.verify_s[tokens] / self.target_step_s
        known = sorted(self.verify_s)
        if not known:
            return 1.0
        if tokens <= known[0] or tokens >= known[-1]:
            nearest = known[0] if tokens <= known[0] else known[-1]
            return self.verify_s[nearest] / self.target_step_s
        lower = max(k for k in known if k < tokens)
        upper = min(k for k in known if k > tokens)
        weight = (tokens - lower) / (upper - lower)
        seconds = (1 - weight) * self.verify_s[lower] + weight * self.verify_s[upper]
        return seconds / self.target_step_s

    def predicted_speedup(self, alpha: float, gamma: int) -> float:
        return predicted_speedup(alpha, gamma, self.cost_ratio, self.verify_cost(gamma + 1))

    def best_gamma(self, alpha: float, gammas: Iterable[int]) -> int:
        return max(gammas, key=lambda g: self.predicted_speedup(alpha, g))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["cost_ratio"] = self.cost_ratio
        data["verify_curve"] = {k: self.verify_cost(k) for k in sorted(self.verify_s)}
        return data


def median_cost_model(models: Sequence[CostModel]) -> CostModel:
    """Per-figure medians of several measurements of the same cost model."""
    keys = set.intersection(*(set(m.verify_s) for m in models))
    return CostModel(
        target_step_s=statistics.median(m.target_step_s for m in models),
        draft_step_s=statistics.median(m.draft_step_s for m in models),
        verify_s={k: statistics.median(m.verify_s[k] for m in models) for k in sorted(keys)},
        context_tokens=models[0].context_tokens,
    )


def _median_call(fn: Callable[[], object], repeats: int, device) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, device=device)[0] for _ in range(repeats))


def _context(model, context_tokens: int, seed: int) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, context_tokens), generator=generator).to(model.device)


def _step_call(model, prompt, width: int, logits_to_keep: int) -> Callable[[], None]:
    """One ``width``-token call after ``prompt``, as decoding runs it: the forward with the
    engine's ``logits_to_keep`` (draft 1, verify 0), ``warp``, and a draw (one token) or the
    acceptance rule (a verify); the call rolls itself back, so it can repeat."""
    greedy = SamplingConfig()
    cached = CachedModel(model, rows=1, slots=prompt.shape[1] + width + 2)
    cached.forward(prompt)
    tokens = prompt[:, :width]
    drafted = tokens[:, 1:]

    def once() -> None:
        probs = warp(cached.forward(tokens, logits_to_keep=logits_to_keep), greedy)
        if width == 1 or logits_to_keep == 1:  # a draft step: draw the next token
            sample(probs[:, -1], uniforms=torch.zeros(1, device=probs.device))
        else:
            verify(drafted, probs[:, 1:], probs, uniforms=(
                torch.zeros(drafted.shape, device=probs.device),
                torch.zeros(1, device=probs.device)))
        cached.rollback([width])

    return once


def _time_step(model, prompt, width: int, logits_to_keep: int, repeats: int) -> float:
    """Median seconds of one ``width``-token call after ``prompt`` (``_step_call``)."""
    return _median_call(_step_call(model, prompt, width, logits_to_keep), repeats, model.device)


@torch.inference_mode()
def measure_cost_model(
    target,
    draft,
    *,
    context_tokens: int = 96,
    max_verify: int = 9,
    repeats: int = 7,
    seed: int = 0,
) -> CostModel:
    """Time, batch 1 after a ``context_tokens`` prefill, through the engine's own code paths:

    * a step of each model as decoding runs it: a one-token forward, ``warp`` and a draw;
    * a k-token target call as the verify runs it (k = 1..max_verify): the forward over k
      tokens, ``warp`` of all k distributions and the acceptance rule.
    Greedy warping; each figure is the median of ``repeats`` rounds in which every call runs
    once (``timing.interleaved_medians``), so the ratios V(k) and c compare calls timed side by side.
    """
    prompt = _context(target, context_tokens, seed)
    calls = {k: _step_call(target, prompt, k, 0) for k in range(1, max_verify + 1)}
    if draft is not None:
        calls["draft"] = _step_call(draft, prompt, 1, 1)
    medians = interleaved_medians(calls, repeats, target.device)
    verify_s = {k: medians[k] for k in range(1, max_verify + 1)}
    draft_step = medians["draft"] if draft is not None else float("nan")
    return CostModel(verify_s[1], draft_step, verify_s, context_tokens)


@dataclass
class SweepRow:
    """One SD setting, measured side by side with the target alone in the same run."""

    gamma: int
    confidence_threshold: float
    tokens_per_s: float
    median_wall_s: float
    repeats_wall_s: list[float]
    block_efficiency: float
    acceptance_rate: float
    analytic_alpha: float
    cost_ratio: float  # measured in these runs: draft step / target-alone step
    verify_cost: float  # V(gamma + 1) (a tree: V(nodes + 1)) from the cost model (1 without)
    predicted_speedup: float
    speedup: float  # tokens/s ÷ the target alone's (of the medians over rounds)
    measured_over_predicted: float
    accepted_length_histogram: list[int] = field(default_factory=list)
    tree: str = ""  # tree drafting (decoding/tree.py); "" = a chain of gamma tokens
    # Prompt lookup tokens (decoding/lookup_step.py), 0 off. The cost model does not price
    # lookup blocks: a chain's prediction ignores them, a tree's uses the measured tau (lookup
    # blocks included) at the tree's cost per block.
    lookup: int = 0
    # Greedy sweeps: SD's rows against the target alone's rows of the same run, same dtype
    # (quality.Agreement.to_dict); None when sampling, where outputs differ by design.
    agreement: dict[str, Any] | None = None
    # Per round: this setting's tokens/s ÷ the target alone's in the same round, and their
    # median: on a machine whose speed drifts between rounds, a ratio within one round
    # compares two methods minutes closer together than the medians do.
    speedup_rounds: list[float] = field(default_factory=list)
    speedup_round_median: float = float("nan")


def round_speedups(walls: Sequence[float], tokens: int, plain_walls: Sequence[float],
                   plain_tokens: int) -> list[float]:
    """Per round r: (tokens / walls[r]) / (plain_tokens / plain_walls[r]), a method's tokens/s
    over the target alone's in the same round."""
    return [(tokens / wall) / (plain_tokens / plain) for wall, plain in zip(walls, plain_walls)]


def _emitted(results: Sequence[GenerationResult]) -> int:
    """New tokens of a method's results, every batch (their decode counts, as ``_row``'s
    tokens/s)."""
    return combined_counts(results).new_tokens


@dataclass
class _Rounds:
    """What ``SpeedProbe.sweep``'s timed rounds collected: per setting (by index) its walls and
    its last round's results; the target alone's; the cost models measured between rounds."""

    walls: dict[int, list[float]]
    results: dict[int, list[GenerationResult]] = field(default_factory=dict)
    plain_walls: list[float] = field(default_factory=list)
    plain_results: list[GenerationResult] = field(default_factory=list)
    cost_models: list[CostModel] = field(default_factory=list)


@dataclass
class Sweep:
    plain_tokens_per_s: float
    plain_wall_s: list[float]
    rows: list[SweepRow]
    cost_model: CostModel | None = None

    @property
    def best(self) -> SweepRow:
        return max(self.rows, key=lambda r: r.tokens_per_s)

    def to_dict(self) -> dict:
        return {
            "plain_tokens_per_s": self.plain_tokens_per_s,
            "plain_wall_s": self.plain_wall_s,
            "rows": [asdict(r) for r in self.rows],
            "best": asdict(self.best) if self.rows else None,
            "cost_model": self.cost_model.to_dict() if self.cost_model else None,
        }


class SpeedProbe:
    """A fixed prompt set decoded by the target alone or with SD, in batches, through the engine."""

    def __init__(
        self,
        target,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        batch_size: int = 1,
        temperature: float = 0.0,
        eos_token_id: Iterable[int] | None = None,
        pad_id: int = 0,
        seed: int = 0,
    ):
        self.target, self.device = target, target.device
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.eos_token_id, self.seed = eos_token_id, seed
        chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
        self.batches = [left_pad(chunk, pad_id, self.device) for chunk in chunks]
        warm_choices(target)  # no timed decode pays a float32 kernel choice (a prefill's width)

    def _common(self) -> dict:
        return dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            eos_token_id=self.eos_token_id,
            generator=torch.Generator(device=self.device).manual_seed(self.seed),
        )

    def plain(self, batches: int | None = None) -> list[GenerationResult]:
        """The target alone over the prompts (the first ``batches`` batches only, if given)."""
        common = self._common()
        return [autoregressive_generate(self.target, i, m, **common)
                for i, m in self.batches[:batches]]

    def speculative(self, draft, gamma: int, threshold: float = 0.0,
                    tree: Tree | str | None = None, lookup: int = 0,
                    batches: int | None = None) -> list[GenerationResult]:
        common = self._common()
        if draft is not None:  # None: the target alone with prompt lookup
            warm_choices(draft)  # only the first call per draft times anything
        return [
            speculative_generate(self.target, draft, i, m, gamma=gamma,
                                 confidence_threshold=threshold, tree=tree, lookup=lookup,
                                 **common)
            for i, m in self.batches[:batches]
        ]

    def sweep(
        self,
        draft,
        settings: Sequence[tuple[int, float] | tuple[int, float, Tree | str | None]
                           | tuple[int, float, Tree | str | None, int]],
        repeats: int,
        cost_model: CostModel | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Sweep:
        """A warm-up of every method (its first batch: enough to warm kernels and allocations,
        without decoding every prompt one more time), then ``repeats`` rounds; each round runs
        the target alone once and SD once per (gamma, threshold), so drift hits every method
        alike, in an order rotated by one method per round (the method timed first, and the
        one timed next to the target alone, change every round); medians, and each setting's
        speed-up per round (``SweepRow.speedup_rounds``).

        With a ``cost_model`` (its context and verify range), the cost model is measured again
        in every round, beside the decoding it predicts, and the predictions use the per-figure
        medians of those in-sweep measurements: on a busy or throttling machine a cost model
        timed minutes earlier describes another machine state.

        A setting is ``(gamma, threshold[, tree[, lookup]])`` (a ``Tree``, or a spec parsed here
        once; ``lookup``: prompt lookup tokens, 0 off); a tree's prediction needs the cost
        model's verify curve to reach its node count + 1."""
        if draft is not None:  # None: settings of prompt lookup alone
            draft.eval()
        settings = [_typed_setting(*setting) for setting in settings]
        self.plain(batches=1)  # warm-ups, discarded
        for setting in settings:
            self.speculative(draft, *setting, batches=1)
        rounds = self._rounds(draft, settings, repeats, cost_model, progress)
        if rounds.cost_models:
            cost_model = median_cost_model(rounds.cost_models)
        rows = [self._row(setting, rounds.walls[i], rounds.results[i], rounds.plain_results,
                          cost_model) for i, setting in enumerate(settings)]
        plain_tokens = _emitted(rounds.plain_results)
        plain_tps = plain_tokens / statistics.median(rounds.plain_walls)
        for index, row in enumerate(rows):
            row.speedup = row.tokens_per_s / plain_tps
            row.measured_over_predicted = row.speedup / row.predicted_speedup
            row.speedup_rounds = round_speedups(rounds.walls[index],
                                                _emitted(rounds.results[index]),
                                                rounds.plain_walls, plain_tokens)
            row.speedup_round_median = statistics.median(row.speedup_rounds)
        return Sweep(plain_tps, rounds.plain_walls, rows, cost_model)

    def _rounds(self, draft, settings, repeats: int, cost_model: CostModel | None,
                progress: Callable[[str], None] | None) -> _Rounds:
        """``repeats`` rounds of the target alone and every setting, in an order rotated by one
        method per round; with a ``cost_model``, that model measured again after each round."""
        rounds = _Rounds({i: [] for i in range(len(settings))})
        started = time.perf_counter()
        methods = [-1, *range(len(settings))]  # -1: the target alone
        for round_index in range(repeats):
            shift = round_index % len(methods)
            for index in methods[shift:] + methods[:shift]:
                if index < 0:
                    wall, rounds.plain_results = timed(self.plain, device=self.device)
                    rounds.plain_walls.append(wall)
                    continue
                wall, rounds.results[index] = timed(
                    self.speculative, draft, *settings[index], device=self.device
                )
                rounds.walls[index].append(wall)
            if cost_model is not None:
                rounds.cost_models.append(measure_cost_model(
                    self.target, draft, context_tokens=cost_model.context_tokens or 96,
                    max_verify=max(cost_model.verify_s, default=1), repeats=3))
            if progress is not None:
                done = round_index + 1
                left = (time.perf_counter() - started) / done * (repeats - done)
                progress(f"round {done}/{repeats} done, ~{left:.0f} s left")
        return rounds

    def _row(self, setting, walls, results, plain_results, cost_model) -> SweepRow:
        gamma, threshold, tree, lookup = setting
        total = combined_counts(results)
        draft_time = sum(r.metrics.draft_time_s for r in results)
        draft_passes = sum(r.metrics.draft_forward_passes - r.metrics.draft_prefill_passes
                           for r in results)
        plain_time = sum(r.metrics.target_time_s for r in plain_results)
        plain_calls = sum(
            r.metrics.target_forward_passes - r.metrics.target_prefill_passes for r in plain_results
        )
        cost_ratio = (draft_time / max(draft_passes, 1)) / (plain_time / max(plain_calls, 1))
        alpha = total.analytic_alpha or 0.0
        c = cost_model.cost_ratio if cost_model is not None else cost_ratio
        if tree is not None:  # tau measured; its cost from the tree's depth and node count
            verify = cost_model.verify_cost(tree.size + 1) if cost_model is not None else 1.0
            predicted = predicted_tree_speedup(total.block_efficiency or 1.0, tree.depth, c, verify)
        else:
            verify = cost_model.verify_cost(gamma + 1) if cost_model is not None else 1.0
            predicted = predicted_speedup(alpha, gamma, c, verify)
        median = statistics.median(walls)
        return SweepRow(
            gamma=gamma,
            confidence_threshold=threshold,
            tokens_per_s=total.new_tokens / median,
            median_wall_s=median,
            repeats_wall_s=walls,
            block_efficiency=total.block_efficiency or 0.0,
            acceptance_rate=total.acceptance_rate or 0.0,
            analytic_alpha=alpha,
            cost_ratio=cost_ratio,
            verify_cost=verify,
            predicted_speedup=predicted,
            speedup=float("nan"),
            measured_over_predicted=float("nan"),
            accepted_length_histogram=total.accepted_length_histogram,
            tree=tree.spec if tree is not None else "",
            lookup=lookup,
            agreement=self._agreement(results, plain_results),
        )

    def _agreement(self, results, plain_results) -> dict[str, Any] | None:
        """Greedy only: how often SD's output equals the target alone's, token for token (in
        fp32 always; in bf16 near-tied logits may differ between the two computations)."""
        if self.temperature != 0:
            return None
        rows = [list(s) for r in results for s in r.sequences]
        reference = [list(s) for r in plain_results for s in r.sequences]
        return agreement(rows, reference).to_dict()


def setting_label(row: dict[str, Any]) -> str:
    """A sweep row's setting for people: 'γ 2, threshold 0.4' or 'tree 4:1 (5 nodes, depth 2)'."""
    lookup = f" + lookup {row['lookup']}" if row.get("lookup") else ""
    if row.get("tree"):
        tree = Tree.parse(row["tree"])
        return f"tree {row['tree']} ({tree.size} nodes, depth {tree.depth}){lookup}"
    threshold = row.get("confidence_threshold", 0.0)
    return f"γ {row['gamma']}" + (f", threshold {threshold:g}" if threshold else "") + lookup


def _typed_setting(gamma: int, threshold: float, tree: Tree | str | None = None, lookup: int = 0):
    """A sweep setting with its tree parsed (None: a chain of gamma tokens) and its prompt
    lookup (0: off)."""
    return gamma, threshold, Tree.parse(tree) if isinstance(tree, str) else tree, lookup


@dataclass
class StepPaths:
    """One model's steps timed eager and compiled side by side (``compare_step_paths``)."""

    role: str
    eager_s: dict[int, float]  # tokens per call -> median seconds
    compiled_s: dict[int, float]
    compile_s: float  # the first calls, which trace and compile every width (cache-dependent)

    @property
    def gain(self) -> float:
        """Eager time / compiled time, geometric mean over the widths decoding uses."""
        ratios = [self.eager_s[k] / self.compiled_s[k] for k in self.eager_s]
        return statistics.geometric_mean(ratios)

    def to_dict(self) -> dict:
        return {"role": self.role, "eager_ms": {k: v * 1e3 for k, v in self.eager_s.items()},
                "compiled_ms": {k: v * 1e3 for k, v in self.compiled_s.items()},
                "compile_s": self.compile_s, "gain": self.gain}


def _widths(cost_model: CostModel, role: str) -> dict[int, float]:
    if role == "draft":
        return {1: cost_model.draft_step_s}
    return dict(cost_model.verify_s)


@torch.inference_mode()
def compare_step_paths(target, draft, *, context_tokens: int = 96, max_verify: int = 9,
                       repeats: int = 7, rounds: int = 3) -> tuple[list[StepPaths], CostModel]:
    """Each model's decoding steps eager vs compiled (``kv_cache.compile_steps``), in one run.

    The first compiled calls are timed as the compile time. Then ``rounds`` rounds each time
    the eager and the compiled cost model (draft step, verify curve V(k)) back to back, so
    drift hits both; per-figure medians. Returns both models' paths and the compiled cost
    model; the models are left as they were (compiled or not).
    """
    models = {"target": target, "draft": draft}
    before = {role: steps_compiled(m) for role, m in models.items() if m is not None}

    def mark(on: bool) -> None:
        for model in models.values():
            if model is not None:
                compile_steps(model, on)

    prompt = _context(target, context_tokens, 0)
    compile_s = {}
    eager, compiled = [], []
    try:
        mark(True)
        for role, model in models.items():
            if model is None:
                continue
            # every shape decoding compiles: the verify widths (all logits), the draft's
            # one- and two-token steps (last logits; two after a full acceptance)
            widths, keep = ((range(1, max_verify + 1), 0) if role == "target" else ((1, 2), 1))
            compile_s[role], _ = timed(lambda m=model, w=widths, k=keep: [
                _time_step(m, prompt, width, k, 1) for width in w])
        for _ in range(rounds):
            for on, store in ((False, eager), (True, compiled)):
                mark(on)
                store.append(measure_cost_model(target, draft, context_tokens=context_tokens,
                                                max_verify=max_verify, repeats=repeats))
    finally:
        for role, model in models.items():
            if model is not None:
                compile_steps(model, before[role])
    eager_model, compiled_model = median_cost_model(eager), median_cost_model(compiled)
    paths = [StepPaths(role, _widths(eager_model, role), _widths(compiled_model, role),
                       compile_s[role]) for role in compile_s]
    return paths, compiled_model

"""The recipe study's grid and its summaries: pure functions, no torch (``--help`` stays fast).

Grid strings are parsed once into typed values, with a ValueError saying what is wrong:

* divergences: ``NAME[:VALUE]``, e.g. ``fkl,rkl,jsd:0.5,tvd,lk:0.2``; VALUE sets the divergence's
  option (``DIVERGENCE_OPTIONS``: jsd's beta, lk's forward-KL weight);
* data sources (where the completions come from): ``teacher-greedy`` / ``teacher-t1`` (the
  target's answers, generated once per task, greedy or at T = 1), ``onpolicy`` (the draft's own
  samples, scored by the target live), ``mixed:λ`` (GKD's λ: the fraction of on-policy batches,
  the rest cached answers) and ``warm:f`` (cached answers for the first fraction f of the
  budget, then on-policy);
* tasks: ``NAME=TRAIN[@CHOICE[@REPORT]]`` (``Task.parse``).

A cell is (task, divergence, data source, seed). Its α summaries per (task, decoding) are the
mean and the spread (max − min) over seeds; the winner has the highest mean, and a group is
"within noise" of it when |mean − winner mean| ≤ max(its spread, the winner's spread).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillspec.common.config import flatten, replace
from distillspec.training.config import DistillConfig

# The DistillConfig field a divergence's :VALUE sets; divergences not listed take no value.
DIVERGENCE_OPTIONS = {"jsd": "jsd_beta", "lk": "lk_kl_weight"}
SOURCE_KINDS = ("teacher-greedy", "teacher-t1", "onpolicy", "mixed", "warm")
ANSWER_SETS = ("greedy", "t1")  # the cached target answers: temperature 0 or 1
ANSWER_TEMPERATURE = {"greedy": 0.0, "t1": 1.0}
DECODINGS = {"t0": "greedy (T=0)", "t1": "sampled (T=1)"}
UNBOUNDED_STEPS = 10**9  # a minutes-only budget: a step cap that never ends a cell
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _number(text: str, what: str, example: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number; write e.g. {example}.") from None


def _slug(label: str) -> str:
    return label.replace(":", "")


@dataclass(frozen=True)
class DivergenceSpec:
    """One divergence of the grid, with its option value (None: the recipe's own)."""

    name: str
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> DivergenceSpec:
        name, colon, value = text.strip().lower().partition(":")
        if not _NAME.match(name):
            raise ValueError(f"Bad divergence {text!r}: expected NAME[:VALUE], e.g. jsd:0.5.")
        if not colon:
            return cls(name)
        if name not in DIVERGENCE_OPTIONS:
            takes = ", ".join(f"{n}:VALUE ({f})" for n, f in DIVERGENCE_OPTIONS.items())
            raise ValueError(
                f"Divergence {text!r}: {name} takes no option. Only {takes} do; write {name}."
            )
        return cls(name, _number(value, f"Divergence {text!r}", f"{name}:0.5"))

    @property
    def label(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value:g}"

    def overrides(self) -> dict[str, Any]:
        """The DistillConfig values this divergence sets."""
        values: dict[str, Any] = {"divergence": self.name}
        if self.value is not None:
            values[DIVERGENCE_OPTIONS[self.name]] = self.value
        return values


@dataclass(frozen=True)
class DataSource:
    """Where a cell's completions come from; ``answers`` is the cached answer set it replays."""

    kind: str
    value: float | None = None
    answers: str | None = None  # "greedy" or "t1"; None: on-policy only

    @classmethod
    def parse(cls, text: str, mix_answers: str = "greedy") -> DataSource:
        kind, colon, value = text.strip().lower().partition(":")
        if kind not in SOURCE_KINDS:
            raise ValueError(
                f"Unknown data source {text!r}: use teacher-greedy, teacher-t1, onpolicy, "
                "mixed:λ (the fraction of on-policy batches) or warm:f (the fraction of the "
                "budget on cached answers first)."
            )
        if kind in ("mixed", "warm"):
            if not colon:
                raise ValueError(f"Data source {kind} needs its fraction, e.g. {kind}:0.5.")
            number = _number(value, f"Data source {text!r}", f"{kind}:0.5")
            if not 0.0 < number < 1.0:
                ends = ("onpolicy", "teacher-" + mix_answers)
                ends = ends if kind == "mixed" else ends[::-1]
                raise ValueError(
                    f"Data source {text!r}: the fraction must lie in (0, 1); its ends are the "
                    f"sources {ends[0]} (1) and {ends[1]} (0)."
                )
            return cls(kind, number, mix_answers)
        if colon:
            raise ValueError(f"Data source {text!r}: {kind} takes no value; write {kind}.")
        answers = {"teacher-greedy": "greedy", "teacher-t1": "t1"}.get(kind)
        return cls(kind, None, answers)

    @property
    def label(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    def overrides(self, answers: str | None, prompts: str, topk: int) -> dict[str, Any]:
        """The DistillConfig values: policy, data (``answers``: the cached answers file;
        ``prompts``: the task's training prompts) and the top-k cache where answers replay."""
        if self.kind == "onpolicy":
            return {"policy": "draft", "data": prompts, "teacher_topk": 0}
        values: dict[str, Any] = {"data": answers, "teacher_topk": topk}
        if self.kind == "mixed":
            fixed = round(1.0 - self.value, 9)
            return {**values, "policy": "mixed", "mix": f"draft={self.value:g},fixed={fixed:g}"}
        if self.kind == "warm":
            return {**values, "policy": "warm", "warm_fraction": self.value}
        return {**values, "policy": "fixed"}


@dataclass(frozen=True)
class Task:
    """A task: training prompts, the held-out split that picks the winner (``choice``), and an
    optional second held-out split every cell is also measured on (``report``), so the winner's
    α is reported on prompts that did not choose it."""

    name: str
    train: str  # builtin:NAME[:train], a data path, or self:N (N prompts the target writes)
    choice: str
    report: str | None = None

    @classmethod
    def parse(cls, text: str) -> Task:
        name, equals, rest = text.strip().partition("=")
        parts = rest.split("@")
        if not equals or not _NAME.match(name) or not 1 <= len(parts) <= 3 or not all(parts):
            raise ValueError(
                f"Bad task {text!r}: expected NAME=TRAIN[@CHOICE[@REPORT]] with a lower-case "
                "NAME, e.g. chat=builtin:chat (choice split builtin:chat:heldout) or "
                "code=train.jsonl@heldout.jsonl."
            )
        train, choice, report = (parts + [None, None])[:3]
        if train.startswith("self:"):
            count = train.removeprefix("self:")
            if not count.isdigit() or not 1 <= int(count) <= 100_000:
                raise ValueError(f"Task {name}: self:N needs a prompt count N in 1..100000, "
                                 f"got {train!r}.")
        return cls(name, train, choice or _default_choice(name, train), report)

    @property
    def self_prompts(self) -> int:
        """N for ``self:N`` (the target writes N prompts, Magpie), else 0."""
        return int(self.train.removeprefix("self:")) if self.train.startswith("self:") else 0


def _default_choice(name: str, train: str) -> str:
    """builtin:X (its training part) is chosen on builtin:X:heldout; anything else must say."""
    dataset, _, part = train.removeprefix("builtin:").partition(":")
    if train.startswith("builtin:") and part in ("", "train"):
        return f"builtin:{dataset}:heldout"
    raise ValueError(
        f"Task {name}: say which held-out prompts choose the winner, e.g. "
        f"{name}={train}@heldout.jsonl. Only a built-in training part (builtin:NAME) has a "
        "held-out split to default to."
    )


@dataclass(frozen=True)
class Cell:
    """One short distillation run of the grid."""

    task: Task
    divergence: DivergenceSpec
    source: DataSource
    seed: int

    @property
    def id(self) -> str:
        return (f"{self.task.name}-{_slug(self.divergence.label)}-{_slug(self.source.label)}"
                f"-s{self.seed}")


def _unique(items: list, what: str, key=lambda item: item) -> list:
    seen = [key(item) for item in items]
    if not items:
        raise ValueError(f"The study needs at least one {what}.")
    repeated = sorted({k for k in seen if seen.count(k) > 1})
    if repeated:
        raise ValueError(f"{what} {', '.join(map(str, repeated))} listed twice; list each once.")
    return items


@dataclass(frozen=True)
class Grid:
    """The parsed grid: every cell in run order (task, seed, divergence, data source)."""

    tasks: list[Task]
    divergences: list[DivergenceSpec]
    sources: list[DataSource]
    seeds: list[int]
    cells: list[Cell] = field(default_factory=list)

    @classmethod
    def parse(cls, tasks: list[str], divergences: list[str], sources: list[str],
              seeds: list[int], mix_answers: str = "greedy") -> Grid:
        parsed_tasks = _unique([Task.parse(t) for t in tasks], "task", lambda t: t.name)
        parsed_divs = _unique([DivergenceSpec.parse(d) for d in divergences], "divergence",
                              lambda d: d.label)
        parsed_sources = _unique([DataSource.parse(s, mix_answers) for s in sources],
                                 "data source", lambda s: s.label)
        _unique(list(seeds), "seed")
        cells = [Cell(task, divergence, source, seed) for task in parsed_tasks for seed in seeds
                 for divergence in parsed_divs for source in parsed_sources]
        _unique(cells, "cell", lambda c: c.id)  # e.g. jsd:0.5 and jsd:0.50
        return cls(parsed_tasks, parsed_divs, parsed_sources, list(seeds), cells)

    @property
    def answer_sets(self) -> list[str]:
        """The cached answer sets some data source replays (generated once per task)."""
        return [a for a in ANSWER_SETS if any(s.answers == a for s in self.sources)]


# -- the folder and each cell's recipe -------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a study keeps things, under its (absolute) output folder."""

    root: Path

    def cell(self, cell: Cell) -> Path:
        return self.root / "cells" / cell.id

    def record(self, cell: Cell) -> Path:
        return self.root / "records" / f"{cell.id}.json"

    def prompts(self, task: Task) -> str:
        """The task's training prompts: its own spec, or the file of self-written ones."""
        if task.self_prompts:
            return str(self.root / "data" / f"{task.name}-prompts.jsonl")
        return task.train

    def answers(self, task: Task, answers: str) -> Path:
        return self.root / "data" / f"{task.name}-{answers}.jsonl"

    def init(self, task: Task) -> Path:
        return self.root / "init" / task.name



def cell_recipe(base: DistillConfig, cell: Cell, layout: Layout, *, minutes: float, steps: int,
                draft_init: str | None = None) -> DistillConfig:
    """The cell's DistillConfig: the base recipe with the cell's divergence, data, seed, budget
    and run folder (the top-k cache shared in ``layout.root/topk`` unless the base names one)."""
    source = cell.source
    answers = str(layout.answers(cell.task, source.answers)) if source.answers else None
    values = {
        **cell.divergence.overrides(),
        **source.overrides(answers, layout.prompts(cell.task), base.teacher_topk),
        "eval_data": cell.task.choice, "seed": cell.seed, "max_minutes": minutes,
        "max_steps": steps or UNBOUNDED_STEPS, "output_dir": str(layout.cell(cell)),
        "teacher_cache": False, "resume": False, "overwrite": False,
        "draft_init": draft_init or base.draft_init,
        "teacher_topk_dir": base.teacher_topk_dir or str(layout.root / "topk"),
    }
    return replace(base, **values)


# -- summaries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One (divergence, data source) of a task at one decoding: α over its seeds."""

    divergence: str
    source: str
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def spread(self) -> float:
        """max − min over seeds (0 with one seed: no noise estimate)."""
        return max(self.values) - min(self.values)


def groups(records: list[dict[str, Any]], task: str, decoding: str) -> dict[tuple[str, str], Group]:
    """α (``alpha_<decoding>``) of the task's finished cells, grouped by (divergence, source)."""
    values: dict[tuple[str, str], list[float]] = {}
    for record in records:
        if record["task"] == task:
            key = (record["divergence"], record["data"])
            values.setdefault(key, []).append(float(record[f"alpha_{decoding}"]))
    return {key: Group(*key, tuple(v)) for key, v in values.items()}


def winner(found: dict[tuple[str, str], Group]) -> Group | None:
    """The group with the highest mean α (the first in grid order on a tie)."""
    return max(found.values(), key=lambda g: g.mean, default=None)


def within_noise(group: Group, best: Group) -> bool:
    """|mean − winner's mean| ≤ max(spread of both): the seeds cannot tell them apart."""
    return abs(group.mean - best.mean) <= max(group.spread, best.spread)


def alpha_table(grid: Grid, records: list[dict[str, Any]], task: str, decoding: str) -> str:
    """A markdown table: divergence rows × data-source columns, "mean ± half the seed range";
    the winner in bold, ≈ where within noise of it, – where no cell has finished."""
    found = groups(records, task, decoding)
    best = winner(found)
    sources = [s.label for s in grid.sources]
    lines = ["| divergence | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
    for divergence in (d.label for d in grid.divergences):
        row = []
        for source in sources:
            group = found.get((divergence, source))
            if group is None:
                row.append("–")
                continue
            text = f"{group.mean:.3f} ± {group.spread / 2:.3f}"
            if group is best:
                text = f"**{text}**"
            elif within_noise(group, best):
                text += " ≈"
            row.append(text)
        lines.append(f"| {divergence} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """12 s, 3.4 min or 2.1 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def eta_text(done: int, total: int, measured: list[float], budget_minutes: float,
             workers: int = 1) -> str:
    """Cells done/total and the time left, estimated from the cells timed in this study run
    (their median wall time × cells left ÷ workers: the median, because the first cell of a
    seed also builds that seed's evaluator); before any was timed, the budget alone."""
    left = total - done
    if left == 0:
        return f"{done}/{total} cells done"
    rounds = -(-left // workers)  # cells each worker still runs, at most
    on = f" on {workers} workers" if workers > 1 else ""
    if measured:
        per_cell = statistics.median(measured)
        return (f"{done}/{total} cells done; ~{duration(per_cell * left / workers)} left ({left} "
                f"cells × {duration(per_cell)}, the median of the {len(measured)} timed here{on})")
    if budget_minutes:
        return (f"{done}/{total} cells done; at least {duration(budget_minutes * 60 * rounds)} "
                f"left ({left} cells × a {budget_minutes:g}-min budget{on}, plus evaluation; a "
                "better estimate after the first cell)")
    return f"{done}/{total} cells done; time left known after the first cell"


def winners(grid: Grid, records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and decoding: the winning (divergence, data source), its mean α and seed spread,
    the groups within noise of it, and its cells (grid order); tasks with no finished cell are
    left out."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for task in grid.tasks:
        for decoding in DECODINGS:
            summary = groups(records, task.name, decoding)
            best = winner(summary)
            if best is None:
                continue
            cells = [r["cell"] for r in records if r["task"] == task.name
                     and (r["divergence"], r["data"]) == (best.divergence, best.source)]
            close = [f"{g.divergence} × {g.source}" for g in summary.values()
                     if g is not best and within_noise(g, best)]
            found.setdefault(task.name, {})[decoding] = {
                "divergence": best.divergence, "data": best.source, "mean": best.mean,
                "spread": best.spread, "seeds": len(best.values), "within_noise": close,
                "cells": cells,
            }
    return found


# Settings that do not change what a cell computes: where the study is written, --fresh, the
# thread count, the number of workers and the trackers.
NOT_GRID = ("out", "fresh", "workers", "recipe.runtime.threads", "recipe.log_with")


def grid_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings (dotted names) whose saved and current values differ, except NOT_GRID:
    "minutes: 3.0 -> 5.0"."""
    old, new = flatten(saved), flatten(current)
    keys = sorted((set(old) | set(new)) - set(NOT_GRID))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys
            if old.get(key) != new.get(key)]


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _task_section(grid: Grid, study: dict[str, Any], task: Task) -> list[str]:
    records = [r for r in study["cells"] if r["task"] == task.name]
    lines = [f"## Task `{task.name}`", "",
             f"Training prompts `{task.train}`; α on `{task.choice}` (chooses the winner)"
             + (f"; also measured on `{task.report}` (reports it)." if task.report else "."), ""]
    start = [_mean([r.get(f"start_alpha_{d}") for r in records]) for d in DECODINGS]
    lines += [f"Undistilled draft: α_t0 {_fmt(start[0])}, α_t1 {_fmt(start[1])}.", ""]
    for decoding, title in DECODINGS.items():
        lines += [f"### α at {title}", "", alpha_table(grid, study["cells"], task.name, decoding), ""]
        best = study["winners"].get(task.name, {}).get(decoding)
        if best is None:
            continue
        cells = [r for r in records if r["cell"] in best["cells"]]
        speedup = _mean([r[f"speedup_{decoding}"] for r in cells])
        text = (f"Winner: **{best['divergence']} × {best['data']}**, α {best['mean']:.3f} (seed "
                f"range {best['spread']:.3f}, {best['seeds']} seed(s)), predicted speed-up "
                f"{_fmt(speedup, 2)}×")
        report = _mean([r.get(f"report_alpha_{decoding}") for r in cells])
        if report is not None:
            text += f"; on the report split α {report:.3f}"
        close = ", ".join(best["within_noise"]) or "none"
        lines += [text + ".", f"Within noise of it: {close}.",
                  f"Recipe: `{best.get('yaml', '')}`; its draft: `{best.get('draft', '')}`.", ""]
    return lines


def _cells_table(study: dict[str, Any]) -> list[str]:
    lines = ["## Every cell", "",
             "| cell | α_t0 | α_t1 | τ | steps | train min | steps/min | speed-up t0 (γ) | "
             "speed-up t1 (γ) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in study["cells"]:
        lines.append(
            f"| {r['cell']} | {r['alpha_t0']:.3f} | {r['alpha_t1']:.3f} | {_fmt(r.get('tau'), 2)} "
            f"| {r['steps']} | {r['train_minutes']:.2f} | {_fmt(r.get('steps_per_minute'), 1)} | "
            f"{r['speedup_t0']:.2f}× ({r['gamma_t0']}) | {r['speedup_t1']:.2f}× ({r['gamma_t1']}) |")
    return lines


def render_markdown(grid: Grid, study: dict[str, Any]) -> str:
    """study.md: how to read it, one α table per task and decoding with its winner, every cell."""
    cost = study.get("cost_model") or {}
    lines = [
        "# Recipe study", "", f"`{study.get('command', 'distillspec study')}`", "",
        f"{len(study['cells'])} of {len(grid.cells)} cells finished; each trained for "
        f"{study['budget']}. α is the mean of Σ min(p, q) on the held-out split (T=0: the rate "
        "at which the draft's argmax is the target's greedy token). Tables: mean ± half the "
        "seed range (max − min) over seeds; the winner (highest mean) in **bold**; ≈ marks a "
        "cell whose mean is within max(its range, the winner's range) of the winner's: the "
        "seeds cannot tell them apart (with one seed every range is 0 and only exact ties are "
        "marked).",
        "",
        f"Predicted speed-up: (1 − α^(γ+1)) / ((1 − α)(γc + V(γ+1))), best γ of "
        f"{study.get('gammas')}, with c = {_fmt(cost.get('cost_ratio'))} and the verify curve V "
        "measured once on this machine for this draft architecture.", "",
    ]
    for task in grid.tasks:
        lines += _task_section(grid, study, task)
    lines += _cells_table(study)
    return "\n".join(lines) + "\n"

"""``distillspec study``: a recipe search as one command, resumable cell by cell.

1. Validate every cell's recipe and the inputs, claim the output folder (a folder holding a
   study with other grid settings is refused), save the resolved config.
2. Load the target once. Measure the cost model once (c and the verify curve depend on the
   draft architecture, not on the recipe). Per task, once: the self-written prompts (``self:N``),
   the target's answers the grid replays (greedy and/or T = 1, ``datagen``), and for a
   ``:vocab=K`` draft the initial draft (a 0-step ``distill`` that picks the K kept tokens from
   the greedy answers), so every cell of a task starts from the same draft.
3. Every cell is a ``distill`` run in ``cells/<id>/`` with the loaded target; its final
   evaluation (α at T = 0 and 1, τ) plus the predicted speed-up and, with a REPORT split, α
   there is written atomically to ``records/<id>.json``. A rerun skips cells with a record and
   resumes a cell from its last checkpoint. ``--workers N``: N processes run the cells, each
   with its own target (``study_workers``); the records and the report are the same.
4. ``study.json``, ``study.md`` (after every cell), heatmaps and ``winners/<task>-<t0|t1>.yaml``
   (a ready ``distill --config`` recipe) at the end.
The grid, its parsing and the summaries are pure functions in ``study_grid``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from distillspec.common.config import changed_flags, from_dict, replace, to_dict
from distillspec.common.io import atomic_write_json, atomic_write_text, read_jsonl
from distillspec.common.rundir import RunFolder, claim
from distillspec.common.runtime import apply_threads
from distillspec.decoding.measure import CostModel, measure_cost_model
from distillspec.models.drafts import split_vocab_option
from distillspec.models.loading import build_draft, eos_token_ids, load_model, pad_token_id
from distillspec.tools.configs import StudyConfig
from distillspec.tools.study_grid import (
    ANSWER_TEMPERATURE,
    DECODINGS,
    Cell,
    Grid,
    Task,
    eta_text,
    grid_differences,
    groups,
    render_markdown,
    winner,
    winners,
    within_noise,
)
from distillspec.training import checkpoint, setup
from distillspec.training.datagen import datagen, self_prompts, write_prompt_pool
from distillspec.training.datasets import load_examples
from distillspec.training.evaluate import SDEvaluator
from distillspec.training.loop import TrainingInterrupted, distill

CONFIG_FILE = "study_config.json"
ENTRIES = ("study_config.json", "study.json", "study.md", "cost_model.json", "cells", "records",
           "data", "topk", "init", "winners", "logs")


def _say(message: str) -> None:
    print(f"study: {message}", file=sys.stderr, flush=True)


@dataclass
class TaskData:
    """What every cell of a task shares: its training prompts and initial draft."""

    prompts: str
    draft_init: str
    data_minutes: float  # generating prompts, answers and the initial draft now (0: found)
    report: SDEvaluator | None = None  # built when the first cell of the task needs it
    # the CHOICE split's evaluator of the seed being run (its T = 1 continuations are seeded),
    # built by the first cell of that seed and shared by the others (cells run seed by seed):
    # the target's held-out continuations and logits cost ~30 s on a 2-core CPU, more than the
    # rest of a cell's evaluation, and ~1 GB, so only one seed's is kept
    evaluators: dict[int, SDEvaluator] = field(default_factory=dict)


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run (or resume) the study; returns study.json's content."""
    started = time.perf_counter()
    apply_threads(config.runtime)
    grid = config.grid()
    _check_inputs(config, grid)  # before anything is written
    out = claim(config.out, "study", fresh=config.fresh)
    out.refuse_links(*ENTRIES)
    out.track(*ENTRIES)
    _check_saved_config(out, config)
    atomic_write_json(out.child(CONFIG_FILE), to_dict(config))
    target, tokenizer = setup.load_target(config.recipe)
    cost = _cost_model(config, out, target, tokenizer)
    tasks = {task.name: _prepare_task(config, grid, task, target, tokenizer) for task in grid.tasks}
    models = [target, tokenizer]  # the only reference: --workers frees it before they load theirs
    del target, tokenizer
    try:
        records = _run_cells(config, grid, tasks, models, cost, out)
    except TrainingInterrupted:
        raise KeyboardInterrupt(
            "study interrupted; the running cell saved a checkpoint. Rerun the same study "
            "command to resume: finished cells are kept, that cell continues from its checkpoint."
        ) from None
    study = _study(config, grid, tasks, records, cost, started)
    _write_winners(config, grid, tasks, study, out)
    if not config.keep_drafts:
        _drop_losing_drafts(config, grid, study)
    _write_heatmaps(grid, study, out)
    _write_summary(grid, study, out)
    _say(f"wrote {out.path / 'study.md'}, study.json, heatmaps and winners/ after "
         f"{study['wall_minutes']:.1f} min")
    return study


# -- inputs and the folder -------------------------------------------------------------------------


def _check_inputs(config: StudyConfig, grid: Grid) -> None:
    """Target, draft and every task's data must exist (nothing loaded, nothing written)."""
    for task in grid.tasks:
        train = task.choice if task.self_prompts else task.train  # self:N is written later
        setup.check_inputs(replace(config.recipe, data=train, eval_data=task.choice))
        if task.report:
            setup.check_inputs(replace(config.recipe, data=task.report, eval_data=None))


def _check_saved_config(out: RunFolder, config: StudyConfig) -> None:
    path = out.path / CONFIG_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    with contextlib.suppress(ValueError, TypeError):
        # a knob added since the study was saved reads as its default, so that an older study
        # resumes when that knob is left at its default (and is refused when it is not)
        saved = to_dict(from_dict(StudyConfig, saved))
    differences = grid_differences(saved, to_dict(config))
    if differences:
        raise ValueError(
            f"{out.path} holds a study with other settings ({'; '.join(differences)}), so its "
            "cells would not compare with new ones. Rerun with the saved settings "
            f"({path}), pass --fresh to start over (only what studies wrote there is removed), "
            "or choose another --out."
        )


def _cost_model(config: StudyConfig, out: RunFolder, target, tokenizer) -> CostModel:
    """c and the verify curve of this draft architecture, measured once (a rerun reuses it)."""
    path = out.child("cost_model.json")
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        return CostModel(saved["target_step_s"], saved["draft_step_s"],
                         {int(k): v for k, v in saved["verify_s"].items()}, saved["context_tokens"])
    keep = split_vocab_option(config.recipe.draft_init)[1]
    ids = torch.arange(keep) if keep else None  # the step time does not depend on which ids
    draft = build_draft(config.recipe.draft_init, target, tokenizer, token_ids=ids)
    _say("measuring the cost model (draft step, verify curve) once ...")
    cost = measure_cost_model(target, draft, max_verify=max(config.gammas) + 1)
    atomic_write_json(path, cost.to_dict())
    return cost


# -- per task, once --------------------------------------------------------------------------------


def _prepare_task(config: StudyConfig, grid: Grid, task: Task, target, tokenizer) -> TaskData:
    """Self-written prompts, the cached answers the grid replays, the initial draft."""
    from tqdm.auto import tqdm

    start, layout, recipe = time.perf_counter(), config.layout, config.recipe
    eos = eos_token_ids(target, tokenizer)
    prompts = layout.prompts(task)
    if task.self_prompts and not Path(prompts).is_file():
        _say(f"task {task.name}: the target writes {task.self_prompts} prompts (once) ...")
        with tqdm(total=task.self_prompts, unit="prompt", desc="self-prompts") as bar:
            pool = self_prompts(target, tokenizer, task.self_prompts, seed=recipe.seed,
                                eos_token_id=eos, batch_size=128, progress=bar.update)
        write_prompt_pool(pool, prompts)
    for answers in grid.answer_sets:
        path = layout.answers(task, answers)
        if path.is_file():
            continue
        examples = load_examples(prompts, tokenizer, max_prompt_tokens=recipe.max_prompt_tokens)
        _say(f"task {task.name}: the target answers {len(examples)} prompts ({answers}, once) ...")
        generator = torch.Generator(device=target.device).manual_seed(recipe.seed)
        with tqdm(total=len(examples), unit="prompt", desc=f"{answers} answers") as bar:
            datagen(target, tokenizer, examples, path, temperature=ANSWER_TEMPERATURE[answers],
                    max_new_tokens=recipe.max_new_tokens, batch_size=128, eos_token_id=eos,
                    generator=generator, progress=bar.update)
    draft_init = _initial_draft(config, grid, task, target, tokenizer)
    return TaskData(prompts, draft_init, (time.perf_counter() - start) / 60)


def _initial_draft(config: StudyConfig, grid: Grid, task: Task, target, tokenizer) -> str:
    """A ``:vocab=K`` draft keeps the K tokens the target emits most on the training data; made
    once per task (a 0-step distill on the greedy answers, else on-policy samples) so that
    every cell starts from the same draft. Other drafts are built by each cell."""
    recipe, layout = config.recipe, config.layout
    if split_vocab_option(recipe.draft_init)[1] is None:
        return recipe.draft_init
    folder = layout.init(task)
    if checkpoint.verify_folder(folder / "final") is not None:
        answers = grid.answer_sets[0] if grid.answer_sets else None
        data = str(layout.answers(task, answers)) if answers else layout.prompts(task)
        _say(f"task {task.name}: building the initial {recipe.draft_init} draft (once) ...")
        distill(replace(recipe, data=data, eval_data=task.choice, max_steps=0, max_minutes=0,
                        policy="fixed" if answers else "draft", teacher_topk=0, resume=False,
                        teacher_cache=False, eval_tau_prompts=0, output_dir=str(folder),
                        overwrite=folder.exists()),
                target=target, tokenizer=tokenizer)
    return str(folder / "final")


def _report_evaluator(config: StudyConfig, task: Task, target, tokenizer) -> SDEvaluator:
    """α on the task's REPORT split (target continuations generated once per task)."""
    recipe = config.recipe
    examples = load_examples(task.report, tokenizer, max_prompt_tokens=recipe.max_prompt_tokens)
    return SDEvaluator(
        target, [e.prompt_ids for e in examples[: config.report_prompts]],
        max_new_tokens=recipe.eval_max_new_tokens, tau_prompts=0, gamma=recipe.eval_gamma,
        eos_token_id=eos_token_ids(target, tokenizer), seed=recipe.seed,
        pad_id=pad_token_id(tokenizer),
    )


# -- the cells -------------------------------------------------------------------------------------


def _run_cells(config: StudyConfig, grid: Grid, tasks: dict[str, TaskData], models, cost,
               out: RunFolder) -> list[dict[str, Any]]:
    """Every cell without a record, in grid order (``--workers N``: N processes take them in
    that order); study.json and study.md after each."""
    layout, records = config.layout, {}
    for cell in grid.cells:
        if layout.record(cell).is_file():
            records[cell.id] = json.loads(layout.record(cell).read_text(encoding="utf-8"))
            _drop_checkpoints(layout.cell(cell))  # a kill between record and clean-up
    pending = [cell for cell in grid.cells if cell.id not in records]
    timed: list[float] = []
    workers = min(config.workers, len(pending)) or 1
    _say(f"{len(grid.cells)} cells, {len(records)} finished earlier (kept)"
         + (f"; {workers} workers" if workers > 1 else "") + "; "
         + eta_text(len(records), len(grid.cells), timed, config.minutes, workers))

    def finished(record: dict[str, Any], resumed: bool) -> None:
        records[record["cell"]] = record
        if not resumed:  # a resumed cell's time is only its remainder: no ETA sample
            timed.append((record["wall_minutes"] - record.get("data_minutes", 0.0)) * 60)
        _say(f"{record['cell']}: α_t0 {record['alpha_t0']:.3f}, α_t1 {record['alpha_t1']:.3f} "
             f"after {record['steps']} steps; " + eta_text(len(records), len(grid.cells), timed,
                                                          config.minutes, workers))
        done = [records[c.id] for c in grid.cells if c.id in records]
        _write_summary(grid, _study(config, grid, tasks, done, cost, None), out)

    if workers > 1:
        from distillspec.tools.study_workers import run_on_workers

        models.clear()  # each worker loads its own target: free this one (on a GPU too)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        run_on_workers(config, tasks, cost, [cell.id for cell in pending], workers, finished)
    else:
        for index, cell in enumerate(pending, len(records) + 1):
            _say(f"cell {index}/{len(grid.cells)} {cell.id}")
            finished(*finish_cell(config, cell, tasks[cell.task.name], models, cost))
    return [records[cell.id] for cell in grid.cells]


def finish_cell(config: StudyConfig, cell: Cell, task: TaskData, models,
                cost: CostModel) -> tuple[dict[str, Any], bool]:
    """Run one cell (resumed from its last checkpoint when it has one), write its record
    atomically, drop its checkpoints; returns the record and whether it was resumed."""
    layout = config.layout
    resumed = checkpoint.find_resumable(layout.cell(cell) / "checkpoints").folder
    if resumed is not None:
        _say(f"{cell.id}: resuming from {resumed.name}")
    start = time.perf_counter()
    record = _run_cell(config, cell, task, models, cost, resumed)
    record["wall_minutes"] = (time.perf_counter() - start) / 60
    atomic_write_json(layout.record(cell), record)
    _drop_checkpoints(layout.cell(cell))
    return record, resumed is not None


def _run_cell(config: StudyConfig, cell: Cell, task: TaskData, models, cost: CostModel,
              resumed: Path | None) -> dict[str, Any]:
    """One distill run (resumed from its checkpoint, else started afresh) and its record."""
    target, tokenizer = models
    recipe = config.cell_recipe(cell, task.draft_init)
    folder = Path(recipe.output_dir)
    fresh_over_leftovers = resumed is None and folder.exists()  # killed before a checkpoint
    recipe = replace(recipe, resume=resumed is not None, overwrite=fresh_over_leftovers)
    if recipe.seed not in task.evaluators:
        task.evaluators.clear()  # free the previous seed's before building this one's
        task.evaluators[recipe.seed] = setup.make_evaluator(recipe, target, tokenizer)
    evaluator = task.evaluators[recipe.seed]
    distill(recipe, target=target, tokenizer=tokenizer, evaluator=evaluator)
    metrics = [r for _, r in read_jsonl(folder / "metrics.jsonl")]
    evals = [r for r in metrics if "eval" in r]
    made = [r["data_seconds"] for r in metrics if "data_seconds" in r]
    final = [r for r in evals if r["eval"] == "final"][-1]
    start = next(r for r in evals if r["eval"] == "start")
    report = {}
    if cell.task.report:
        if task.report is None:
            task.report = _report_evaluator(config, cell.task, target, tokenizer)
        draft, _ = load_model(folder / "final", device=target.device, dtype="float32")
        report = task.report.alpha(draft)
    record = cell_record(cell, final, start, cost, config.gammas, report, folder)
    # the cell's data time: scoring an answer set's top-k (done by the first cell that replays
    # it, for all) or loading it; neither training nor evaluation, left out of the ETA
    record["data_minutes"] = (made[-1] if made else 0.0) / 60
    return record


def cell_record(cell: Cell, final: dict, start: dict, cost: CostModel, gammas: list[int],
                report: dict[str, float], folder: Path) -> dict[str, Any]:
    """A cell's result: its final evaluation, budget used and predicted speed-ups."""
    minutes = final.get("train_seconds", 0.0) / 60
    record: dict[str, Any] = {
        "cell": cell.id, "task": cell.task.name, "divergence": cell.divergence.label,
        "data": cell.source.label, "seed": cell.seed,
        "alpha_t0": final["alpha_t0"], "alpha_t1": final["alpha_t1"], "tau": final.get("tau"),
        "start_alpha_t0": start["alpha_t0"], "start_alpha_t1": start["alpha_t1"],
        "steps": final["step"], "train_minutes": minutes,
        "steps_per_minute": final["step"] / minutes if minutes else None,
        "output_dir": str(folder),
    }
    for decoding in DECODINGS:
        alpha = record[f"alpha_{decoding}"]
        gamma = cost.best_gamma(alpha, gammas)
        record[f"gamma_{decoding}"] = gamma
        record[f"speedup_{decoding}"] = cost.predicted_speedup(alpha, gamma)
    record.update({f"report_{key}": value for key, value in report.items()})
    return record


def _drop_checkpoints(cell_dir: Path) -> None:
    """A finished cell keeps its final draft; its checkpoints (distill's own: folders with our
    manifest, the pointer) are removed, and nothing else."""
    checkpoints = cell_dir / "checkpoints"
    if checkpoints.is_symlink() or not checkpoints.is_dir():
        return
    for entry in checkpoints.iterdir():
        if entry.name.startswith("step-") and not entry.is_symlink() and (
                entry / checkpoint.MANIFEST).is_file():
            shutil.rmtree(entry)
        elif entry.name == checkpoint.POINTER and entry.is_file() and not entry.is_symlink():
            entry.unlink()
    if not any(checkpoints.iterdir()):
        checkpoints.rmdir()


def _drop_losing_drafts(config: StudyConfig, grid: Grid, study: dict[str, Any]) -> None:
    """Remove the final drafts of cells that won nothing (distill's own folders, checked by
    their manifest); their records keep every number."""
    kept = {cell for by_decoding in study["winners"].values() for best in by_decoding.values()
            for cell in best["cells"]}
    for cell in grid.cells:
        final = config.layout.cell(cell) / "final"
        if cell.id not in kept and not final.is_symlink() and (final / checkpoint.MANIFEST).is_file():
            shutil.rmtree(final)


# -- outputs ---------------------------------------------------------------------------------------


def _study(config: StudyConfig, grid: Grid, tasks: dict[str, TaskData], records: list[dict],
           cost: CostModel, started: float | None) -> dict[str, Any]:
    parts = [f"{config.minutes:g} min" if config.minutes else "",
             f"{config.steps} steps" if config.steps else ""]
    budget = " or ".join(p for p in parts if p) + (" (the first to end)" if all(parts) else "")
    return {
        "command": ("distillspec study " + changed_flags(config)).strip(),
        "config": to_dict(config), "budget": budget, "gammas": config.gammas,
        "cost_model": cost.to_dict(),
        "tasks": {t.name: {"train": t.train, "choice": t.choice, "report": t.report,
                           "prompts": tasks[t.name].prompts, "draft_init": tasks[t.name].draft_init,
                           "data_minutes_now": tasks[t.name].data_minutes} for t in grid.tasks},
        "cells": records,
        "winners": winners(grid, records),
        "wall_minutes": (time.perf_counter() - started) / 60 if started is not None else None,
    }


def _write_summary(grid: Grid, study: dict[str, Any], out: RunFolder) -> None:
    atomic_write_json(out.child("study.json"), study)
    atomic_write_text(out.child("study.md"), render_markdown(grid, study))


def _write_winners(config: StudyConfig, grid: Grid, tasks: dict[str, TaskData],
                   study: dict[str, Any], out: RunFolder) -> None:
    """winners/<task>-<t0|t1>.yaml: the winning cell's recipe (its first seed), ready for
    ``distillspec distill --config``, with its own output folder."""
    cells = {cell.id: cell for cell in grid.cells}
    for task, by_decoding in study["winners"].items():
        for decoding, best in by_decoding.items():
            cell = cells[best["cells"][0]]
            name = f"{task}-{best['divergence']}-{best['data']}".replace(":", "")
            recipe = config.cell_recipe(cell, tasks[task].draft_init)
            recipe = replace(recipe, output_dir=f"runs/{name}", **_absolute_paths(recipe))
            path = out.child(f"winners/{task}-{decoding}.yaml")
            header = (f"# The winner of {config.layout.root} for task {task} at "
                      f"{DECODINGS[decoding]}: {best['divergence']} x {best['data']}, mean alpha "
                      f"{best['mean']:.3f} over {best['seeds']} seed(s).\n"
                      f"# distillspec distill --config {path}  (raise max_minutes / max_steps "
                      "for a longer run)\n")
            atomic_write_text(path, header + yaml.safe_dump(to_dict(recipe), sort_keys=False))
            best["yaml"] = str(path)
            best["draft"] = str(config.layout.cell(cell) / "final")


def _absolute_paths(recipe) -> dict[str, str]:
    """The recipe's paths that exist here, made absolute, so the winner's YAML works from any
    folder (builtin: and target-layers: specs stay as they are)."""
    keys = ("target", "draft_init", "data", "eval_data", "filter_reference")
    given = {key: getattr(recipe, key) or "" for key in keys}
    return {key: str(Path(value).resolve()) for key, value in given.items()
            if value and Path(value).exists()}


def _write_heatmaps(grid: Grid, study: dict[str, Any], out: RunFolder) -> None:
    from distillspec.tools.plots import plot_study_heatmap

    rows, columns = [d.label for d in grid.divergences], [s.label for s in grid.sources]
    for task in grid.tasks:
        for decoding, title in DECODINGS.items():
            found = groups(study["cells"], task.name, decoding)
            best = winner(found)
            if best is None:
                continue
            values = {key: (g.mean, g.spread, "winner" if g is best else
                            "noise" if within_noise(g, best) else "")
                      for key, g in found.items()}
            name = f"heatmap-{task.name}-{decoding}.png"
            plot_study_heatmap(rows, columns, values, f"{task.name}: α at {title} "
                               "(★ winner, ≈ within seed noise)", out.child(name))

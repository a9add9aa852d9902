"""``distillspec study``: grid parsing, the winner and noise rules, the warm-start policy, and a
tiny study end to end: outputs, a winner YAML that distill loads, resume after SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny

from distillspec.common.config import build, from_dict
from distillspec.tools.cli import load_recipe, main
from distillspec.tools.configs import StudyConfig
from distillspec.tools.study_grid import (
    DataSource,
    DivergenceSpec,
    Grid,
    Group,
    Task,
    alpha_table,
    eta_text,
    grid_differences,
    winner,
    winners,
    within_noise,
)
from distillspec.training.config import DistillConfig
from distillspec.training.policies import (
    CachedTeacherPolicy,
    FixedPolicy,
    WarmStartPolicy,
    cached_component,
    make_policy,
)
from distillspec.training.setup import TrainState, budget_progress

HERE = Path(__file__).parent

# -- the grid --------------------------------------------------------------------------------------


def test_divergences_parse_with_their_option():
    assert DivergenceSpec.parse("jsd:0.25").overrides() == {"divergence": "jsd", "jsd_beta": 0.25}
    assert DivergenceSpec.parse("lk:0.5").overrides() == {"divergence": "lk", "lk_kl_weight": 0.5}
    assert DivergenceSpec.parse(" TVD ").overrides() == {"divergence": "tvd"}
    assert DivergenceSpec.parse("jsd:0.50").label == "jsd:0.5"


@pytest.mark.parametrize("text,message", [
    ("fkl:0.3", "fkl takes no option"),
    ("jsd:half", "not a number"),
    ("", "expected NAME"),
])
def test_divergence_errors(text, message):
    with pytest.raises(ValueError, match=message):
        DivergenceSpec.parse(text)


def test_data_sources_map_to_policies():
    answers, prompts = "answers.jsonl", "prompts.jsonl"
    greedy = DataSource.parse("teacher-greedy")
    assert greedy.answers == "greedy" and DataSource.parse("teacher-t1").answers == "t1"
    assert greedy.overrides(answers, prompts, 32) == {
        "policy": "fixed", "data": answers, "teacher_topk": 32}
    assert DataSource.parse("onpolicy").overrides(None, prompts, 32) == {
        "policy": "draft", "data": prompts, "teacher_topk": 0}  # no cache for live samples
    mixed = DataSource.parse("mixed:0.3", mix_answers="t1")
    assert mixed.answers == "t1"
    assert mixed.overrides(answers, prompts, 8)["mix"] == "draft=0.3,fixed=0.7"
    warm = DataSource.parse("warm:0.25").overrides(answers, prompts, 8)
    assert (warm["policy"], warm["warm_fraction"], warm["teacher_topk"]) == ("warm", 0.25, 8)


@pytest.mark.parametrize("text,message", [
    ("greedy", "Unknown data source"),
    ("mixed", "needs its fraction"),
    ("mixed:1", r"must lie in \(0, 1\)"),
    ("warm:0", r"must lie in \(0, 1\)"),
    ("onpolicy:0.5", "takes no value"),
])
def test_data_source_errors(text, message):
    with pytest.raises(ValueError, match=message):
        DataSource.parse(text)


def test_tasks_parse_and_default_their_choice_split():
    assert Task.parse("chat=builtin:chat") == Task("chat", "builtin:chat", "builtin:chat:heldout")
    task = Task.parse("code=train.jsonl@choice.jsonl@report.jsonl")
    assert (task.choice, task.report, task.self_prompts) == ("choice.jsonl", "report.jsonl", 0)
    assert Task.parse("chat=self:64@builtin:chat:heldout").self_prompts == 64


@pytest.mark.parametrize("text,message", [
    ("chat", "expected NAME=TRAIN"),
    ("Chat=builtin:chat", "expected NAME=TRAIN"),
    ("a=b@c@d@e", "expected NAME=TRAIN"),
    ("code=train.jsonl", "say which held-out prompts"),
    ("chat=builtin:chat:all", "say which held-out prompts"),  # its held-out part is inside
    ("chat=self:many@x.jsonl", "self:N needs a prompt count"),
])
def test_task_errors(text, message):
    with pytest.raises(ValueError, match=message):
        Task.parse(text)


def test_grid_orders_cells_and_refuses_repeats():
    grid = Grid.parse(["a=builtin:chat"], ["fkl", "jsd:0.5"], ["onpolicy", "warm:0.2"], [0, 1])
    assert [c.id for c in grid.cells[:4]] == [
        "a-fkl-onpolicy-s0", "a-fkl-warm0.2-s0", "a-jsd0.5-onpolicy-s0", "a-jsd0.5-warm0.2-s0"]
    assert len(grid.cells) == 8 and grid.answer_sets == ["greedy"]
    for args, message in [
        ((["a=builtin:chat"], ["jsd:0.5", "jsd:0.50"], ["onpolicy"], [0]), "jsd:0.5 listed twice"),
        ((["a=builtin:chat", "a=builtin:humaneval"], ["fkl"], ["onpolicy"], [0]), "task a listed"),
        ((["a=builtin:chat"], ["fkl"], ["onpolicy"], [1, 1]), "seed 1 listed twice"),
        ((["a=builtin:chat"], [], ["onpolicy"], [0]), "at least one divergence"),
    ]:
        with pytest.raises(ValueError, match=message):
            Grid.parse(*args)


def test_study_config_validates_every_cell_before_anything_runs():
    config = StudyConfig(tasks=["c=builtin:chat"], divergences=["fkl", "lk:0.2"], seeds=[0],
                         data_sources=["teacher-greedy", "mixed:0.5"])
    recipe = config.cell_recipe(config.grid().cells[-1])
    assert (recipe.divergence, recipe.lk_kl_weight, recipe.policy) == ("lk", 0.2, "mixed")
    assert recipe.teacher_topk == 32 and recipe.data.endswith("data/c-greedy.jsonl")
    for overrides, message in [
        (dict(minutes=0, steps=0), "needs a budget per cell"),
        (dict(divergences=["kl"]), "Study cell c-kl-teacher-greedy-s0: divergence must be"),
        (dict(divergences=["lk:2"]), "lk_kl_weight must be in"),
        (dict(recipe={"max_completion_tokens": 8}), "answers would be cut"),
        (dict(gammas=[0]), "gammas must lie"),
    ]:
        with pytest.raises(ValueError, match=message):
            from_dict(StudyConfig, {"tasks": ["c=builtin:chat"], **overrides})


# -- winner, noise, tables, ETA ----------------------------------------------------------------------


def test_winner_and_the_noise_mark():
    best = Group("fkl", "onpolicy", (0.40, 0.44))  # mean 0.42, range 0.04
    close = Group("rkl", "onpolicy", (0.39, 0.39))  # 0.03 below: within the winner's range
    wide = Group("tvd", "onpolicy", (0.30, 0.42))  # 0.06 below, but its own range is 0.12
    far = Group("jsd", "onpolicy", (0.35, 0.36))
    found = {(g.divergence, g.source): g for g in (close, best, wide, far)}
    assert winner(found) is best
    assert within_noise(close, best) and within_noise(wide, best) and not within_noise(far, best)
    assert within_noise(Group("a", "b", (0.42,)), Group("c", "d", (0.42,)))  # one seed: ties only


def records_for(grid: Grid, alphas: dict[str, float]) -> list[dict]:
    return [{"cell": c.id, "task": c.task.name, "divergence": c.divergence.label,
             "data": c.source.label, "seed": c.seed, "alpha_t0": alphas[c.id],
             "alpha_t1": 0.5} for c in grid.cells if c.id in alphas]


def test_alpha_table_and_winners_from_records():
    grid = Grid.parse(["a=builtin:chat"], ["fkl", "tvd"], ["onpolicy", "teacher-greedy"], [0, 1])
    alphas = {"a-fkl-onpolicy-s0": 0.30, "a-fkl-onpolicy-s1": 0.34,
              "a-tvd-onpolicy-s0": 0.33, "a-tvd-onpolicy-s1": 0.33,
              "a-fkl-teacher-greedy-s0": 0.20, "a-fkl-teacher-greedy-s1": 0.22}
    table = alpha_table(grid, records_for(grid, alphas), "a", "t0")
    assert table.splitlines()[0] == "| divergence | onpolicy | teacher-greedy |"
    assert "| fkl | 0.320 ± 0.020 ≈ | 0.210 ± 0.010 |" in table
    assert "| tvd | **0.330 ± 0.000** | – |" in table  # the cell that has not run: –
    found = winners(grid, records_for(grid, alphas))["a"]["t0"]
    assert (found["divergence"], found["data"], found["seeds"]) == ("tvd", "onpolicy", 2)
    assert found["within_noise"] == ["fkl × onpolicy"]
    assert found["cells"] == ["a-tvd-onpolicy-s0", "a-tvd-onpolicy-s1"]


def test_grid_differences_ignore_where_the_study_is_written():
    saved = {"seeds": [0, 1], "out": "a", "recipe": {"lr": 0.003, "runtime": {"threads": 2}}}
    same = {"seeds": [0, 1], "out": "b", "recipe": {"lr": 0.003, "runtime": {"threads": 8}}}
    assert grid_differences(saved, same) == []
    other = {**same, "recipe": {"lr": 0.01, "runtime": {"threads": 2}}}
    assert grid_differences(saved, other) == ["recipe.lr: 0.003 -> 0.01"]


def test_eta_comes_from_measured_cells():
    assert eta_text(2, 10, [60.0, 120.0], 1.0).startswith("2/10 cells done; ~12.0 min left")
    # the median: a first cell that also built its seed's evaluator does not skew the estimate
    assert "~6.0 min left (6 cells × 60 s, the median of the 3 timed here)" in eta_text(
        3, 9, [60.0, 300.0, 50.0], 1.0)
    assert "at least 16 s left" in eta_text(0, 4, [], 1 / 15)
    assert eta_text(3, 3, [], 1.0) == "3/3 cells done"
    assert eta_text(2, 10, [60.0, 120.0], 1.0, workers=2).startswith(
        "2/10 cells done; ~6.0 min left")
    assert "at least 2.0 min left (3 cells × a 1-min budget on 2 workers" in eta_text(
        0, 3, [], 1.0, workers=2)  # two rounds of cells


def test_workers_split_the_threads_and_are_not_part_of_the_grid():
    from distillspec.tools.study_workers import worker_threads

    assert [worker_threads(total, 2) for total in (1, 2, 5, 16)] == [1, 1, 2, 8]
    assert grid_differences({"workers": 1, "seeds": [0]}, {"workers": 4, "seeds": [0]}) == []
    for workers, message in [(0, "workers must be >= 1"), (1000, "workers must be <= 256")]:
        with pytest.raises(ValueError, match=message):
            from_dict(StudyConfig, {"tasks": ["c=builtin:chat"], "workers": workers})


# -- the warm-start policy -------------------------------------------------------------------------


class Named:
    def __init__(self, name):
        self.name = name


def warm_policy(config, state, fraction):
    return WarmStartPolicy(FixedPolicy(), Named("draft"), fraction,
                           lambda: budget_progress(config, state))


def test_warm_start_switches_at_its_fraction_of_the_step_budget():
    config, state = DistillConfig(max_steps=8), TrainState()
    policy = warm_policy(config, state, 0.25)
    picks = []
    for step in range(8):
        state.step = step
        picks += [policy.choose().name, policy.choose().name]  # grad_accum 2: one pick per step
    assert picks == ["fixed"] * 4 + ["draft"] * 12
    assert cached_component(policy) is policy.warm  # where a top-k cache attaches


def test_warm_start_switches_on_time_when_minutes_end_the_run_first():
    config, state = DistillConfig(max_steps=1000, max_minutes=1.0), TrainState(step=10)
    policy = warm_policy(config, state, 0.5)
    state.train_seconds = 29.0
    assert policy.choose().name == "fixed"
    state.train_seconds = 30.0
    assert policy.choose().name == "draft"


def test_make_policy_builds_the_warm_start():
    policy = make_policy("warm", warm_fraction=0.5, progress=lambda: 0.0, max_new_tokens=5)
    assert (policy.warm.name, policy.then.name, policy.then.max_new_tokens) == ("fixed", "draft", 5)
    cached = make_policy("warm", warm_fraction=0.5, progress=lambda: 0.0,
                         teacher_completions={"a": [5]})
    assert isinstance(cached.warm, CachedTeacherPolicy)  # teacher_cache replays in the warm phase
    with pytest.raises(ValueError, match="needs warm_fraction"):
        make_policy("warm")
    with pytest.raises(ValueError, match="only used by the 'mixed' policy"):
        make_policy("warm", mix={"draft": 1.0}, warm_fraction=0.5, progress=lambda: 0.0)


def test_warm_start_resumes_with_the_choice_it_made():
    config, state = DistillConfig(max_steps=1000, max_minutes=1.0), TrainState(step=10)
    policy = warm_policy(config, state, 0.5)
    state.train_seconds = 31.0
    policy.choose()
    saved = json.loads(json.dumps(policy.state_dict()))  # as a checkpoint round trip
    resumed_state = TrainState(step=10, train_seconds=29.5)  # e.g. timing noise on resume
    resumed = warm_policy(config, resumed_state, 0.5)
    resumed.load_state_dict(saved)
    assert resumed.choose().name == "draft" and resumed.warm_batches == policy.warm_batches
    with pytest.raises(ValueError, match="warm start was"):
        warm_policy(config, state, 0.3).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        warm_policy(config, state, 1.0)


def test_distill_takes_a_loaded_target_only_as_the_recipe_would_load_it():
    import torch
    from conftest import tiny_model, tiny_tokenizer

    from distillspec.training.setup import run_target

    config = from_dict(DistillConfig, {"bf16": "off", "runtime": {"device": "cpu"}})
    target, tokenizer = tiny_model(), tiny_tokenizer()
    assert run_target(config, torch.device("cpu"), target, tokenizer) == (target, tokenizer)
    with pytest.raises(ValueError, match="runs it on cpu in torch.float32"):
        run_target(config, torch.device("cpu"), target.to(torch.bfloat16), tokenizer)
    with pytest.raises(ValueError, match="without its tokenizer"):
        run_target(config, torch.device("cpu"), target, None)


# -- a tiny study end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    save_tiny(root / "target", layers=3, lm_scale=10.0)
    for name, count, offset in (("train.jsonl", 24, 0), ("heldout.jsonl", 4, 50),
                                ("report.jsonl", 4, 70)):
        (root / name).write_text("".join(
            json.dumps({"prompt": f"w{i + offset} w{i + offset + 3} w{i + offset + 7}"}) + "\n"
            for i in range(count)))
    return root


def study_args(root: Path, out: str, sources: str, steps: int = 4) -> list[str]:
    return [
        "--tasks", f"tiny={root / 'train.jsonl'}@{root / 'heldout.jsonl'}@{root / 'report.jsonl'}",
        "--divergences", "fkl,tvd", "--data-sources", sources, "--seeds", "0",
        "--minutes", "0", "--steps", str(steps), "--out", str(root / out), "--gammas", "1,2",
        "--report-prompts", "4", "--recipe.target", str(root / "target"),
        "--recipe.draft-init", "target-layers:1:vocab=40", "--recipe.batch-size", "4",
        "--recipe.max-new-tokens", "6", "--recipe.max-completion-tokens", "6",
        "--recipe.eval-prompts", "4", "--recipe.eval-tau-prompts", "1",
        "--recipe.eval-max-new-tokens", "6", "--recipe.save-every", "2",
        "--recipe.teacher-topk", "8", "--recipe.warmup-steps", "1", "--recipe.bf16", "off",
        "--device", "cpu", "--dtype", "float32",
    ]


@pytest.mark.slow
def test_tiny_study_writes_tables_heatmaps_and_a_winner_distill_loads(workspace, monkeypatch):
    from distillspec.training.evaluate import SDEvaluator

    built = []
    original = SDEvaluator.__init__
    monkeypatch.setattr(SDEvaluator, "__init__",
                        lambda self, *a, **k: built.append(1) or original(self, *a, **k))
    assert main(["study", *study_args(workspace, "study", "teacher-greedy,mixed:0.5")]) == 0
    # the target's held-out continuations, once each: the initial draft's evaluation, the
    # CHOICE split (one seed, shared by the 4 cells) and the REPORT split
    assert len(built) == 3
    out = workspace / "study"
    study = json.loads((out / "study.json").read_text())
    assert [r["cell"] for r in study["cells"]] == [
        "tiny-fkl-teacher-greedy-s0", "tiny-fkl-mixed0.5-s0",
        "tiny-tvd-teacher-greedy-s0", "tiny-tvd-mixed0.5-s0"]
    for record in study["cells"]:
        assert record["steps"] == 4 and 0 <= record["alpha_t0"] <= 1 and record["tau"] >= 1
        assert record["speedup_t0"] > 0 and record["gamma_t1"] in (1, 2)
        assert 0 <= record["report_alpha_t1"] <= 1  # measured on the report split too
    assert len(list((out / "topk").glob("*.safetensors"))) == 1  # scored once for all cells
    for record in study["cells"]:  # a cell's data time (that scoring, or loading it) is its own
        metrics = (out / "cells" / record["cell"] / "metrics.jsonl").read_text().splitlines()
        seconds = [json.loads(line)["data_seconds"] for line in metrics if "data_seconds" in line]
        assert record["data_minutes"] == pytest.approx(seconds[-1] / 60)
    assert len({r["start_alpha_t0"] for r in study["cells"]}) == 1  # one initial draft
    markdown = (out / "study.md").read_text()
    assert "| divergence | teacher-greedy | mixed:0.5 |" in markdown and "Winner: **" in markdown
    for decoding in ("t0", "t1"):
        assert (out / f"heatmap-tiny-{decoding}.png").stat().st_size > 1000
        path = out / "winners" / f"tiny-{decoding}.yaml"
        recipe = build(DistillConfig, load_recipe(str(path)))
        best = study["winners"]["tiny"][decoding]
        assert recipe.divergence == best["divergence"] and recipe.max_steps == 4
        assert Path(recipe.target).is_absolute() and recipe.output_dir.startswith("runs/")
    won = {cell for best in study["winners"]["tiny"].values() for cell in best["cells"]}
    for record in study["cells"]:  # finished: no checkpoints; complete: the winners' drafts only
        cell = out / "cells" / record["cell"]
        assert not (cell / "checkpoints").exists()
        assert (cell / "final").is_dir() == (record["cell"] in won)


@pytest.mark.slow
def test_a_killed_study_resumes_the_cell_it_was_in_and_keeps_finished_ones(workspace):
    args = study_args(workspace, "killed", "teacher-greedy,warm:0.5", steps=6)
    killed = "tiny-fkl-warm0.5-s0"  # the second cell: killed after its step-4 checkpoint
    result = subprocess.run([sys.executable, str(HERE / "fault_study.py"), killed, "4", *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    out = workspace / "killed"
    first = out / "records" / "tiny-fkl-teacher-greedy-s0.json"
    before = (first.read_bytes(), first.stat().st_mtime_ns,
              (out / "cells" / "tiny-fkl-teacher-greedy-s0" / "metrics.jsonl").read_bytes())
    assert not (out / "records" / f"{killed}.json").exists()
    assert main(["study", *args, "--seeds", "0,1"]) == 2  # another grid: refused
    assert main(["study", *args]) == 0
    assert (first.read_bytes(), first.stat().st_mtime_ns,
            (out / "cells" / "tiny-fkl-teacher-greedy-s0" / "metrics.jsonl").read_bytes()) == before
    assert_resumed_once(out / "cells" / killed)
    study = json.loads((out / "study.json").read_text())
    assert len(study["cells"]) == 4 and all(r["steps"] == 6 for r in study["cells"])


def assert_resumed_once(cell: Path) -> None:
    """The cell was resumed, not restarted: each step once, and the warm start switched at step
    3 of 6."""
    lines = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval"] for r in lines if "eval" in r] == ["start", "resume", "final"]
    assert [r["policy"] for r in lines if "loss" in r] == ["fixed"] * 3 + ["draft"] * 3


def record_values(out: Path) -> dict[str, dict]:
    """Every record by cell, without what timing decides (wall and training time, the cost
    model's speed-ups and best γ) and where it was written."""
    timed = ("wall_minutes", "data_minutes", "train_minutes", "steps_per_minute",
             "output_dir", "speedup_t0", "speedup_t1", "gamma_t0", "gamma_t1")
    study = json.loads((out / "study.json").read_text())
    return {r["cell"]: {k: v for k, v in r.items() if k not in timed} for r in study["cells"]}


@pytest.mark.slow
def test_two_workers_run_the_same_cells_as_one(workspace):
    """1 worker with 1 thread and 2 workers with 1 thread each: training is deterministic per
    cell (seeded data, sampling and evaluation; fp32 on one thread), so every α is equal."""
    sources = "teacher-greedy,mixed:0.5"
    assert main(["study", *study_args(workspace, "one-worker", sources), "--threads", "1"]) == 0
    assert main(["study", *study_args(workspace, "two-workers", sources), "--threads", "2",
                 "--workers", "2"]) == 0
    one, two = workspace / "one-worker", workspace / "two-workers"
    first, second = (json.loads((out / "study.json").read_text()) for out in (one, two))
    assert [r["cell"] for r in second["cells"]] == [r["cell"] for r in first["cells"]]
    assert [sorted(r) for r in second["cells"]] == [sorted(r) for r in first["cells"]]
    assert record_values(two) == record_values(one)  # α (t0, t1, report, start), τ, steps
    def chosen(study: dict) -> dict:  # the winners, without their paths in each study's folder
        return {task: {decoding: {k: v for k, v in best.items() if k not in ("yaml", "draft")}
                       for decoding, best in by.items()} for task, by in study["winners"].items()}

    assert chosen(second) == chosen(first)
    assert (two / "study.md").read_text().count("| tiny-") == 4
    assert sorted(p.name for p in (two / "logs").iterdir()) == ["worker-0.log", "worker-1.log"]
    assert len(list((two / "topk").glob("*.safetensors"))) == 1  # scored once for both workers
    for decoding in ("t0", "t1"):
        assert (two / f"heatmap-tiny-{decoding}.png").is_file()
        assert (two / "winners" / f"tiny-{decoding}.yaml").is_file()


@pytest.mark.slow
def test_a_killed_worker_has_its_cell_rerun_from_its_checkpoint(workspace):
    args = study_args(workspace, "killed-worker", "teacher-greedy,warm:0.5", steps=6)
    killed = "tiny-fkl-warm0.5-s0"  # a worker dies right after this cell's step-4 checkpoint
    result = subprocess.run([sys.executable, str(HERE / "fault_study_workers.py"), killed, "4",
                             *args, "--workers", "2", "--threads", "2"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stopped (signal 9) in cell {killed}; a new worker reruns it" in result.stderr
    out = workspace / "killed-worker"
    assert_resumed_once(out / "cells" / killed)
    study = json.loads((out / "study.json").read_text())
    assert len(study["cells"]) == 4 and all(r["steps"] == 6 for r in study["cells"])
    assert len(list((out / "logs").glob("worker-*.log"))) == 3  # the dead one and its successor


def test_a_study_saved_before_a_knob_existed_resumes_at_that_knob_s_default(tmp_path):
    """A knob added after a study was saved (its saved config lacks the key) reads as its default:
    the study resumes with the knob at its default and is refused with it changed."""
    from distillspec.common.config import to_dict
    from distillspec.common.rundir import RunFolder
    from distillspec.tools.study import CONFIG_FILE, _check_saved_config

    config = StudyConfig(tasks=["c=builtin:chat"], seeds=[0])
    saved = to_dict(config)
    del saved["recipe"]["train_layers"]  # as written before train_layers existed
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    folder = RunFolder(tmp_path, "study")
    _check_saved_config(folder, config)  # no error
    changed = from_dict(StudyConfig, {**to_dict(config),
                                      "recipe": {**to_dict(config)["recipe"], "train_layers": "last:1"}})
    with pytest.raises(ValueError, match=r"recipe.train_layers: 'all' -> 'last:1'"):
        _check_saved_config(folder, changed)

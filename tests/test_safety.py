"""Never lose a user's work: one test per probe of the "bad input / fault" review.

Each data-loss case asserts the exit code, the message and that every pre-existing file is still
there byte for byte. The fault matrix kills (SIGKILL) or interrupts (SIGINT) a run at several
points of a checkpoint write and checks that a resume reaches the uninterrupted run's weights.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny
from safetensors.torch import load_file

from distillspec.common.config import from_dict, to_dict
from distillspec.tools.cli import main
from distillspec.training.config import DistillConfig
from distillspec.training.loop import distill

HERE = Path(__file__).parent


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def user_files(folder: Path) -> dict[str, bytes]:
    """A folder that looks like a run but is the user's: none of it may be touched."""
    for name, text in {
        "final/config.json": "{}",
        "checkpoints/step-000001/notes.txt": "mine",
        "checkpoints/a.tmp-123": "mine too",
        "metrics.jsonl": '{"step": 1, "mine": true}\n',
        "thesis.tex": "\\documentclass{article}",
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return snapshot(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    save_tiny(root / "target", layers=3, lm_scale=10.0)
    rng = random.Random(0)
    with (root / "data.jsonl").open("w") as handle:
        for _ in range(40):
            prompt = " ".join(f"w{rng.randrange(0, 92)}" for _ in range(rng.randrange(2, 6)))
            completion = " ".join(f"w{rng.randrange(0, 92)}" for _ in range(6))
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return root


def recipe(workspace: Path, out: Path, **overrides) -> DistillConfig:
    values = dict(
        target=str(workspace / "target"), draft_init="target-layers:1",
        data=str(workspace / "data.jsonl"), policy="draft", max_steps=12, batch_size=4,
        max_new_tokens=5, lr=1e-3, warmup_steps=1, eval_every=0, save_every=3,
        keep_checkpoints=4, eval_prompts=4, eval_tau_prompts=0, eval_max_new_tokens=4,
        held_out=4, output_dir=str(out), runtime={"device": "cpu"}, bf16="off", seed=0,
    )
    values.update(overrides)
    return from_dict(DistillConfig, values)


def write_recipe(config: DistillConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def weights(run: Path) -> dict:
    return load_file(run / "final" / "model.safetensors")


def assert_same_weights(actual: dict, expected: dict) -> None:
    import torch

    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def reference(workspace):
    out = workspace / "reference"
    distill(recipe(workspace, out))
    return weights(out)


# -- 1-3: output folders are ours or refused --------------------------------------------------------


def test_demo_fresh_with_a_bad_target_touches_nothing(tmp_path, capsys):
    foreign = tmp_path / "mine"
    before = user_files(foreign)
    code = main(["demo", "--fresh", "--out", str(foreign), "--distill.target", "/nonexistent"])
    assert code == 2 and "not found" in capsys.readouterr().err
    assert snapshot(foreign) == before
    # an existing demo folder is not emptied either when an input is bad
    ours = tmp_path / "demo"
    ours.mkdir()
    (ours / ".distillspec-run.json").write_text(json.dumps({"kind": "demo", "entries": ["run"]}))
    (ours / "run").mkdir()
    (ours / "run" / "keep.txt").write_text("still here")
    before = snapshot(ours)
    assert main(["demo", "--fresh", "--out", str(ours), "--distill.target", "/nonexistent"]) == 2
    assert snapshot(ours) == before


def test_demo_refuses_a_foreign_folder_with_valid_inputs(tmp_path, workspace, capsys):
    foreign = tmp_path / "mine"
    before = user_files(foreign)
    report = tmp_path / "report.jsonl"  # prompts apart from the training and choice ones
    report.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2} w{i + 3} w{i + 4} "
                                                    f"w{i + 5} w{i + 6}"}) + "\n" for i in range(3)))
    code = main(["demo", "--fresh", "--out", str(foreign), "--distill.target",
                 str(workspace / "target"), "--distill.data", str(workspace / "data.jsonl"),
                 "--distill.eval-data", str(workspace / "data.jsonl"), "--prompt-pool", "0",
                 "--extra-prompts", "none", "--report-data", str(report)])
    err = capsys.readouterr().err
    assert code == 2 and "is not empty" in err and "not a distillspec demo folder" in err
    assert snapshot(foreign) == before


def test_distill_refuses_a_folder_it_did_not_create(tmp_path, workspace, capsys):
    foreign = tmp_path / "run"
    before = user_files(foreign)
    config = write_recipe(recipe(workspace, foreign), tmp_path / "r.yaml")
    for extra in ([], ["--resume"], ["--overwrite"]):
        assert main(["distill", "--config", str(config), *extra]) == 2
        assert "not a distillspec distill folder" in capsys.readouterr().err
        assert snapshot(foreign) == before


def test_overwrite_removes_only_what_runs_wrote(tmp_path, workspace, capsys):
    out = tmp_path / "run"
    config = recipe(workspace, out, max_steps=2, save_every=1)
    distill(config)
    (out / "my-notes.txt").write_text("keep me")
    assert main(["distill", "--config", str(write_recipe(config, tmp_path / "r.yaml"))]) == 2
    assert "--resume to continue it, --overwrite to start over" in capsys.readouterr().err
    distill(recipe(workspace, out, max_steps=2, save_every=1, overwrite=True))
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-000001", "step-000002"
    ]


def test_links_out_of_the_run_folder_are_never_followed(tmp_path, workspace, capsys):
    out, outside = tmp_path / "run", tmp_path / "outside"
    distill(recipe(workspace, out, max_steps=2, save_every=1))
    outside.mkdir()
    (outside / "step-000001").mkdir()
    (outside / "step-000001" / "precious.bin").write_bytes(b"\x00\x01")
    (outside / "metrics.jsonl").write_text("not yours\n")
    before = snapshot(outside)
    import shutil

    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").symlink_to(outside, target_is_directory=True)
    config = write_recipe(recipe(workspace, out, max_steps=4, save_every=1, resume=True),
                          tmp_path / "r.yaml")
    assert main(["distill", "--config", str(config)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    (out / "checkpoints").unlink()
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    assert main(["distill", "--config", str(config)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert snapshot(outside) == before


# -- 4, 6: resume you can trust ------------------------------------------------------------------


@pytest.mark.parametrize("pointer", ["empty", "dangling", "deleted"])
def test_resume_finds_the_newest_complete_checkpoint(tmp_path, workspace, reference, pointer):
    out = tmp_path / "run"
    distill(recipe(workspace, out))
    import shutil

    shutil.rmtree(out / "final")
    latest = out / "checkpoints" / "latest"
    {"empty": lambda: latest.write_text(""), "dangling": lambda: latest.write_text("step-999\n"),
     "deleted": latest.unlink}[pointer]()
    kept = snapshot(out / "checkpoints")
    distill(recipe(workspace, out, resume=True))
    assert_same_weights(weights(out), reference)
    for name, data in kept.items():  # complete checkpoints were not retrained or pruned
        if "step-000012" in name:
            assert (out / "checkpoints" / name).read_bytes() == data


def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, workspace, reference,
                                                               capsys):
    out = tmp_path / "run"
    distill(recipe(workspace, out))
    import shutil

    shutil.rmtree(out / "final")
    newest = out / "checkpoints" / "step-000012" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    distill(recipe(workspace, out, resume=True))
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint step-000012" in err and "step-000009" in err
    assert_same_weights(weights(out), reference)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 13)), "metrics are de-duplicated on resume"


def test_resume_with_nothing_to_resume_says_so(tmp_path, workspace, capsys):
    out = tmp_path / "new"
    distill(recipe(workspace, out, max_steps=1, resume=True))
    assert "nothing to resume" in capsys.readouterr().err
    stale = tmp_path / "stale"
    distill(recipe(workspace, stale, max_steps=1))
    import shutil

    shutil.rmtree(stale / "checkpoints")
    config = write_recipe(recipe(workspace, stale, max_steps=1, resume=True), tmp_path / "r.yaml")
    assert main(["distill", "--config", str(config)]) == 2
    assert "no complete checkpoint to resume" in capsys.readouterr().err


# -- 5, 7, 9: typed configs, bounded inputs, one error boundary ----------------------------------------


def test_yaml_values_are_typed_before_anything_loads(tmp_path, workspace, capsys):
    base = to_dict(recipe(workspace, tmp_path / "run"))
    base["target"] = "/nonexistent"  # a model load would fail differently: nothing may load
    for key, value, message in [
        ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
        ("resume", "maybe", "resume must be true or false, got 'maybe'"),
        ("lr", "fast", "lr must be a number, got 'fast'"),
        ("max_steps", True, "max_steps must be an integer, got the boolean True"),
        ("lr", float("inf"), "lr must be a finite number"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, key: value}))
        assert main(["distill", "--config", str(path)]) == 2
        assert message in capsys.readouterr().err
    path.write_text(yaml.safe_dump(base).replace("lr: 0.001", "lr: 1e-3"))  # YAML 1.1 string
    assert yaml.safe_load(path.read_text())["lr"] == "1e-3"
    from distillspec.common.config import build
    from distillspec.tools.cli import load_recipe

    assert build(DistillConfig, load_recipe(str(path))).lr == 0.001
    assert build(DistillConfig, {**base, "resume": "false"}).resume is False


def test_list_knobs_refuse_empty_entries():
    from distillspec.common.config import coerce

    assert coerce("3:1, 4:1 15:2", list[str], "trees") == ["3:1", "4:1", "15:2"]
    assert coerce("", list[str], "trees") == []
    assert coerce("1,2", list[int], "gammas") == [1, 2]
    for text in ["3:1,,4:1", "3:1,", ",3:1", " , "]:
        with pytest.raises(ValueError, match="trees has an empty entry"):
            coerce(text, list[str], "trees")


def test_bounded_inputs_fail_at_once(workspace, capsys):
    target = str(workspace / "target")
    for flags, message in [
        (["--gamma", "1000000000"], "gamma must be an integer >= 1 and <= 64"),
        (["--temperature", "inf"], "temperature must be a finite number"),
        (["--temperature", "nan"], "temperature must be a finite number"),
        (["--max-new-tokens", "100000000000"], "max_new_tokens must be <="),
        (["--batch-size", "0"], "batch_size must be >= 1"),
    ]:
        assert main(["generate", "--target", target, "--prompt", "w1", *flags]) == 2
        assert message in capsys.readouterr().err


def test_bad_files_name_the_file_and_the_line(tmp_path, workspace, capsys):
    target = str(workspace / "target")
    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(b'{"prompt": "w1"}\n{"prompt": "w2 \xff"}\n')
    assert main(["generate", "--target", target, "--draft", "none", "--prompts", str(bad)]) == 2
    assert f"{bad}:2: not valid UTF-8" in capsys.readouterr().err
    assert main(["generate", "--target", target, "--prompts", str(tmp_path)]) == 2
    assert "is a folder, not a data file" in capsys.readouterr().err
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text((workspace / "target" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["generate", "--target", str(broken), "--draft", "none", "--prompt", "w1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distillspec: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_output_that_cannot_be_a_folder_is_refused_before_loading(tmp_path, workspace, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = write_recipe(recipe(workspace, blocker / "run"), tmp_path / "r.yaml")
    assert main(["distill", "--config", str(config)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["bench", "--target", str(workspace / "target"), "--out", str(blocker)]) == 2
    assert "output must be a folder" in capsys.readouterr().err


def test_datagen_and_bench_refuse_what_is_not_theirs(tmp_path, workspace, capsys):
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"my": "notes"}\n')
    args = ["datagen", "--target", str(workspace / "target"), "--data",
            str(workspace / "data.jsonl"), "--out", str(mine), "--max-new-tokens", "2"]
    for extra in ([], ["--overwrite"]):
        assert main(args + extra) == 2
        assert "not a file datagen wrote" in capsys.readouterr().err
        assert mine.read_text() == '{"my": "notes"}\n'
    generated = tmp_path / "teacher.jsonl"
    args[-3] = str(generated)
    assert main(args) == 0
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    foreign = tmp_path / "bench"
    before = user_files(foreign)
    assert main(["bench", "--target", str(workspace / "target"), "--out", str(foreign)]) == 2
    assert "not a distillspec bench folder" in capsys.readouterr().err
    assert snapshot(foreign) == before


# -- 8 and the fault matrix: SIGKILL / SIGINT at points of a checkpoint write ------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "point,sig",
    [("staging", "KILL"), ("rename", "KILL"), ("pointer", "KILL"), ("prune", "KILL"),
     ("staging", "INT"), ("pointer", "INT")],
)
def test_fault_during_a_checkpoint_write_then_resume(tmp_path, workspace, reference, point, sig):
    out = tmp_path / "run"
    config = write_recipe(recipe(workspace, out), tmp_path / "r.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(HERE / "fault_run.py"), str(config), point, sig],
                            capture_output=True, text=True, env=env, timeout=300)
    if sig == "KILL":
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    else:  # Ctrl-C: the step finishes, a checkpoint is written, exit 130, no traceback
        assert result.returncode == 130, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "--resume" in result.stderr
        assert "interrupted after step 7" in result.stderr
    assert not (out / "final").exists()
    distill(recipe(workspace, out, resume=True))
    assert_same_weights(weights(out), reference)
    assert not list((out / "checkpoints").glob("*.tmp*"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 13)), "metrics are de-duplicated on resume"

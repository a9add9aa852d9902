"""The bench pipeline end to end on tiny local models (fast settings; not a timing test)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import save_tiny

from distillspec.common.config import from_dict, to_dict
from distillspec.common.runtime import RuntimeConfig, machine_kind
from distillspec.models.loading import load_model
from distillspec.tools.bench import (
    bench_main,
    earlier_settings,
    markdown_table,
    models_fingerprint,
)
from distillspec.tools.configs import BenchConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    save_tiny(root / "target", layers=3)
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(5))
    )
    (root / "question.jsonl").write_text(
        json.dumps({"question_id": 7, "category": "demo", "turns": ["w1 w2", "w3"]}) + "\n"
    )
    return root


def test_bench_reports_every_method_and_metric(setup):
    config = BenchConfig(
        target=str(setup / "target"),
        draft="target-layers:1",
        prompts=str(setup / "prompts.jsonl"),
        num_prompts=4,
        gammas=[1, 3],
        temperatures=[0.0, 1.0],
        batch_sizes=[1, 2],
        max_new_tokens=6,
        repeats=1,
        out=str(setup / "out"),
        compile="off",
        runtime=RuntimeConfig(device="cpu", dtype="float32"),
    )
    report = bench_main(config)
    assert report["step_paths"] == [] and "--compile off" in report["compile"][0]
    assert [(s["temperature"], s["batch_size"]) for s in report["settings"]] == [
        (0.0, 1),
        (0.0, 2),
        (1.0, 1),
        (1.0, 2),
    ]
    for setting in report["settings"]:
        assert setting["recommended"]["gamma"] in (1, 3)
        for row in setting["rows"]:
            assert 0 <= row["analytic_alpha"] <= 1 and row["block_efficiency"] >= 1
            assert row["predicted_speedup"] > 0 and row["cost_ratio"] > 0
            assert row["verify_cost"] > 0 and row["tokens_per_s"] > 0
            # one round: its ratio is the ratio of the medians
            assert row["speedup_rounds"] == [pytest.approx(row["speedup"])]
            if setting["batch_size"] == 1:
                assert row["hf_assisted"]["new_tokens"] == 4 * 6
            else:
                assert row["hf_assisted"] is None and "batch size 1" in row["hf_assisted_note"]
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (setup / "out" / name).stat().st_size > 0
    table = markdown_table(report)
    assert "batch-1 only" in table and "★" in table
    speedup = report["settings"][0]["rows"][0]["speedup"]
    assert f"{speedup:.2f}× ({speedup:.2f}–{speedup:.2f})" in table  # the per-round column


def test_spec_bench_answers(setup):
    config = BenchConfig(
        target=str(setup / "target"),
        draft="target-layers:1",
        prompts=str(setup / "prompts.jsonl"),
        num_prompts=1,
        gammas=[2],
        temperatures=[0.0],
        batch_sizes=[1],
        max_new_tokens=5,
        repeats=1,
        out=str(setup / "spec"),
        question_file=str(setup / "question.jsonl"),
        compile="off",
        runtime=RuntimeConfig(device="cpu", dtype="float32"),
    )
    bench_main(config)
    sd, baseline = (
        [json.loads(line) for line in (setup / "spec" / name).read_text().splitlines()]
        for name in ("answers-sd.jsonl", "answers-baseline.jsonl")
    )
    choice = sd[0]["choices"][0]
    assert sd[0]["question_id"] == 7 and len(choice["turns"]) == 2
    assert all(n >= 1 for n in choice["new_tokens"]) and len(choice["wall_time"]) == 2
    # One flat list of tokens per target call, as Spec-Bench's speed.py averages it.
    assert all(isinstance(n, int) and n >= 1 for n in choice["accept_lengths"])
    assert sum(choice["accept_lengths"]) >= sum(choice["new_tokens"])
    assert baseline[0]["question_id"] == 7 and len(baseline[0]["choices"][0]["turns"]) == 2


def test_bench_config_validation():
    with pytest.raises(ValueError, match="gammas"):
        from_dict(BenchConfig, {"gammas": "0,2"})
    with pytest.raises(ValueError, match="temperatures"):
        from_dict(BenchConfig, {"temperatures": "-1"})
    assert from_dict(BenchConfig, {"gammas": "1, 3"}).gammas == [1, 3]


def test_bench_compares_eager_and_compiled_steps_and_records_verdicts(setup, tmp_path,
                                                                     monkeypatch):
    import torch

    from distillspec.models.compilation import load_verdicts
    from distillspec.models.drafts import truncate_layers
    from distillspec.models.loading import load_model
    from distillspec.models.pruned_head import prune_head
    from distillspec.training.checkpoint import save_model_folder

    monkeypatch.setenv("DISTILLSPEC_COMPILE_VERDICTS", str(tmp_path / "verdicts.json"))
    target, tokenizer = load_model(setup / "target", device="cpu", dtype="float32")
    pruned = prune_head(truncate_layers(target, 1), torch.arange(48))  # a pruned-head draft
    save_model_folder(tmp_path / "draft", pruned, tokenizer, {}, "a test draft")
    config = BenchConfig(
        target=str(setup / "target"), draft=str(tmp_path / "draft"),
        prompts=str(setup / "prompts.jsonl"), num_prompts=2, gammas=[2], temperatures=[0.0], batch_sizes=[1], max_new_tokens=6,
        repeats=1, out=str(tmp_path / "out"), compile="on",
        runtime=RuntimeConfig(device="cpu", dtype="float32"),
    )
    report = bench_main(config)
    roles = [path["role"] for path in report["step_paths"]]
    assert roles == ["target", "draft"]
    target_path = report["step_paths"][0]
    assert sorted(target_path["eager_ms"]) == [1, 2, 3] == sorted(target_path["compiled_ms"])
    assert all(path["gain"] > 0 and path["compile_s"] > 0 for path in report["step_paths"])
    verdicts = load_verdicts()
    assert len(verdicts) == 2 and {v["role"] for v in verdicts.values()} == {"target", "draft"}
    assert all("compiled" in line for line in report["compile"])  # --compile on
    setting = report["settings"][0]
    static = setting["hf_static_compiled_plain"]
    assert static.get("new_tokens") == 2 * 6 or "error" in static
    row = setting["rows"][0]  # a pruned draft: transformers also gets its full-vocabulary export
    assert row["hf_assisted_full_vocab_export"]["new_tokens"] == 2 * 6
    assert row["ours_over_hf_assisted_export"] > 0
    assert "eager ÷ compiled" in markdown_table(report)
    assert "full-vocabulary export" in markdown_table(report)


def test_bench_carries_on_eager_where_compiling_fails(setup, tmp_path, monkeypatch):
    import distillspec.tools.bench as bench

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Compiling the decoding step failed (no C++ compiler)")

    monkeypatch.setattr(bench, "compare_step_paths", no_compiler)
    config = BenchConfig(
        target=str(setup / "target"), draft="target-layers:1", prompts=str(setup / "prompts.jsonl"),
        num_prompts=1, gammas=[1], temperatures=[0.0], batch_sizes=[1], max_new_tokens=3,
        repeats=1, out=str(tmp_path / "out"), runtime=RuntimeConfig(device="cpu", dtype="float32"),
    )
    report = bench_main(config)  # auto: reported, then eager
    assert "no C++ compiler" in report["compile_error"] and report["step_paths"] == []
    assert all("eager" in line for line in report["compile"])
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        bench_main(replace(config, compile="on", out=str(tmp_path / "out-on")))


def _resume_config(setup, **changes) -> BenchConfig:
    return replace(BenchConfig(
        target=str(setup / "target"), draft="target-layers:1",
        prompts=str(setup / "prompts.jsonl"), num_prompts=2, gammas=[2], temperatures=[0.0, 1.0],
        batch_sizes=[1, 2], max_new_tokens=4, repeats=1, out=str(setup / "resume"),
        compile="off", runtime=RuntimeConfig(device="cpu", dtype="float32"),
    ), **changes)


def test_a_stopped_bench_keeps_its_finished_settings_and_a_rerun_measures_only_the_rest(
        setup, monkeypatch):
    import distillspec.tools.bench as bench

    measured, real = [], bench.bench_setting

    def stops_at_the_third(probe, hf, config, batch_size, *args, **kwargs):
        if len(measured) == 2:
            raise KeyboardInterrupt  # the bench stopped (Ctrl-C) in its third setting
        measured.append((probe.temperature, batch_size))
        return real(probe, hf, config, batch_size, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_setting", stops_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        bench_main(_resume_config(setup))
    partial = json.loads((setup / "resume" / "bench.json").read_text())
    assert measured == [(0.0, 1), (0.0, 2)]
    assert partial["complete"] is False and len(partial["settings"]) == 2
    assert "**Partial**" in (setup / "resume" / "bench.md").read_text()

    counted = []

    def counts(probe, *args, **kwargs):
        counted.append(probe.temperature)
        return real(probe, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_setting", counts)
    notes = []
    report = bench_main(_resume_config(setup), progress=notes.append)
    assert counted == [1.0, 1.0]  # only T=1's two batch sizes were measured
    assert report["complete"] is True and len(report["settings"]) == 4
    assert [s.get("kept_from_earlier_run", False) for s in report["settings"]] == [
        True, True, False, False]
    assert report["settings"][0]["rows"] == partial["settings"][0]["rows"]
    assert any("resuming the stopped run" in n for n in notes)
    assert "Kept from a stopped run" in (setup / "resume" / "bench.md").read_text()

    # a finished run of the same command is measured again in full
    counted.clear()
    again = bench_main(_resume_config(setup))
    assert counted == [0.0, 0.0, 1.0, 1.0]
    assert not any(s.get("kept_from_earlier_run") for s in again["settings"])


@pytest.mark.parametrize("change", ["no-resume", "other-knob", "other-machine", "other-dtype",
                                    "other-weights", "damaged-setting"])
def test_a_stopped_bench_is_not_resumed_with_no_resume_another_command_machine_or_weights(
        setup, change):
    config = _resume_config(setup, out=str(setup / f"stopped-{change}"))
    path = setup / f"stopped-{change}.json"
    target, _ = load_model(config.target, device="cpu", dtype=torch.float32)
    draft, _ = load_model(config.target, device="cpu", dtype=torch.float32)
    draft.model.layers = draft.model.layers[:1]
    setting = {"temperature": 0.0, "batch_size": 1, "rows": [], "recommended": {}}
    stopped = {"complete": False, "config": json.loads(json.dumps(to_dict(config))),
               "machine": machine_kind(target.device), "dtype": str(target.dtype),
               "models": models_fingerprint(target, draft), "settings": [setting]}
    path.write_text(json.dumps(stopped))
    assert earlier_settings(config, path, target, models_fingerprint(target, draft))[0] == [setting]  # the control
    if change == "no-resume":
        config = replace(config, resume=False)
    elif change == "other-knob":
        config = replace(config, max_new_tokens=5)
    elif change == "other-machine":
        path.write_text(json.dumps({**stopped, "machine": "cpu:another CPU:2 threads"}))
    elif change == "other-dtype":
        path.write_text(json.dumps({**stopped, "dtype": "torch.bfloat16"}))
    elif change == "other-weights":
        with torch.no_grad():  # the draft trained a step further since the bench stopped
            draft.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    else:
        path.write_text(json.dumps({**stopped, "settings": [{"temperature": 0.0}, None]}))
    kept, note = earlier_settings(config, path, target, models_fingerprint(target, draft))
    assert kept == []
    if change == "no-resume":
        assert note == ""
    elif change == "damaged-setting":  # resumed, with nothing usable to keep
        assert "its 0 finished setting(s) are kept" in note
    else:
        assert "measuring every setting again" in note

"""The demo pipeline end to end on a tiny local model (seconds): choose, measure, distil, measure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_tiny

from distillspec.common.config import replace
from distillspec.models.recommended import FILE
from distillspec.tools.cli import main


def test_demo_runs_reuses_and_starts_fresh(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path / "cache"))
    save_tiny(tmp_path / "target", layers=3, lm_scale=10.0)
    for name, start, count in (("train.jsonl", 0, 24), ("heldout.jsonl", 30, 4),
                               ("report.jsonl", 40, 3), ("extra.jsonl", 50, 5)):
        (tmp_path / name).write_text("".join(
            json.dumps({"prompt": f"w{i} w{i + 3} w{i + 7}"}) + "\n"
            for i in range(start, start + count)))
    args = [
        "demo",
        "--distill.target", str(tmp_path / "target"),
        "--prompt-pool", "0",  # the tiny tokenizer has no chat template to write prompts with
        "--distill.data", str(tmp_path / "train.jsonl"),
        "--extra-prompts", str(tmp_path / "extra.jsonl"),  # answered too, trained on beside
        "--distill.eval-data", str(tmp_path / "heldout.jsonl"),
        "--draft-layers", "1,2", "--draft-vocab", "40",
        "--minutes", "0.03",
        "--out", str(tmp_path / "demo"),
        "--gammas", "1,2",
        "--confidence-thresholds", "0,0.5",
        "--max-new-tokens", "6",
        "--distill.max-new-tokens", "6",
        "--distill.eval-prompts", "4",
        "--speed-prompts", "2",
        "--report-data", str(tmp_path / "report.jsonl"),
        "--distill.eval-every", "6",
        "--distill.batch-size", "4",
        "--device", "cpu",
        "--dtype", "float32",
        "--repeats", "1",
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    for side in ("before", "after"):
        assert {"alpha_t0", "alpha_t1", "target_tokens_per_s", "by_gamma", "best"} <= set(
            report[side]
        )
        assert [row["gamma"] for row in report[side]["by_gamma"]] == [1, 2]
    assert {(r["gamma"], r["confidence_threshold"]) for r in report["after"]["all"]} == {
        (1, 0.0), (2, 0.0), (2, 0.5)  # a threshold cannot change a 1-token draft
    }
    assert report["draft"]["rule"] == "auto" and report["draft"]["spec"].endswith(":vocab=40")
    # On a CPU under --draft-quantize auto the best setting is timed with int8 weights too, side
    # by side with the weights as loaded, and the faster weights are reported and saved.
    duel = report["weights_duel"]
    assert [len(duel["tokens_per_s"][w]) for w in ("none", "int8")] == [3, 3]
    assert report["draft_weights"] == ("int8" if duel["int8_over_none"] > 1 else "none")
    assert 0 <= duel["int8_alpha_t0"] <= 1
    # The chosen setting, timed again on the report split, beside alpha there.
    reported, best = report["report_split"], report["after"]["best"]
    assert reported["prompts"] == 3 and 0 <= reported["alpha_t0"] <= 1
    assert (reported["setting"]["gamma"], reported["setting"]["tree"]) == (best["gamma"], best["tree"])
    assert report["split_agreement"]["speedup"]["choice"] == best["speedup"]
    rounds = reported["setting"]["speedup_rounds"]  # one per report round, and their median
    assert len(rounds) == 2 and reported["setting"]["speedup_round_median"] == sum(rounds) / 2
    assert 0 <= report["before"]["report_split"]["alpha_t0"] <= 1
    assert [c["layers"] for c in report["draft"]["candidates"]] == [1, 2]
    assert report["train_steps"] >= 1 and report["evals"][0]["eval"] == "start"
    for plot in ("alpha_over_training.png", "gamma_sweep.png"):
        assert (tmp_path / "demo" / plot).stat().st_size > 1000
    captured = capsys.readouterr()
    assert "| alpha (greedy, T=0) |" in captured.out and "SD speed-up vs target alone" in captured.out
    assert "report split: speed-up at the chosen setting" in captured.out
    assert "; per round " in captured.out
    assert "Draft chosen by measured cost" in captured.out
    assert "| draft weights (the faster in a duel at the best setting) |" in captured.out
    assert "| T=1: report split, speed-up at that setting |" in captured.out
    assert "at T=1 it ran" in captured.err
    saved = json.loads((tmp_path / "demo" / "run" / "final" / FILE).read_text())
    assert saved["draft_quantize"] == report["draft_weights"]
    best = report["after"]["best"]  # a tree is saved when it won; the fastest chain always
    chains = [r for r in report["after"]["all"] if not r["tree"]]
    chain = max(chains, key=lambda r: r["sd_tokens_per_s"])
    assert saved["measured"]["speedup"] == reported["setting"]["speedup"]
    assert (saved["gamma"], saved["confidence_threshold"]) == (
        chain["gamma"], chain["confidence_threshold"])
    assert saved["tree"] == best["tree"]
    assert {r["tree"] for r in report["after"]["all"]} == {"", "3:1", "4:1", "15:2"}
    # every tree timed with and without prompt lookup (--lookup 8, the default); chains without
    assert sorted((r["tree"], r["lookup"]) for r in report["after"]["all"] if r["tree"]) == [
        (tree, lookup) for tree in ("15:2", "3:1", "4:1") for lookup in (0, 8)]
    assert not any(r["lookup"] for r in chains)
    assert saved["lookup"] == best["lookup"] == reported["setting"]["lookup"]
    assert saved["measured"]["cost_model"]["verify_curve"]  # the machine's verify curve
    # At T=1 the fastest greedy chain and every tree (with and without lookup) are timed again
    # on the choice split, the fastest of them on the report split, and saved beside the
    # greedy setting.
    sampled = report["sampled"]
    assert sampled["temperature"] == 1.0
    assert [(r["gamma"], r["tree"], r["lookup"]) for r in sampled["choice"]["all"]] == [
        (chain["gamma"], "", 0), *[(1, tree, k) for k in (0, 8) for tree in ("3:1", "4:1", "15:2")]]
    fastest = sampled["choice"]["best"]
    assert fastest["speedup"] == max(r["speedup"] for r in sampled["choice"]["all"])
    assert sampled["report"]["setting"]["tree"] == fastest["tree"]
    assert saved["sampled"] == {
        "temperature": 1.0, "gamma": chain["gamma"],
        "confidence_threshold": chain["confidence_threshold"], "tree": fastest["tree"],
        "lookup": fastest["lookup"], "speedup": sampled["report"]["setting"]["speedup"],
        "choice_speedup": fastest["speedup"]}
    cached = sorted((tmp_path / "cache" / "demo-data").glob("*/answers.jsonl"),
                    key=lambda path: len(path.read_text().splitlines()))
    # The target's greedy answers to each part, generated once, the two joined, its T=1 samples
    # for the same 29 prompts (--answer-samples 1, the default), and all joined for training.
    assert [len(path.read_text().splitlines()) for path in cached] == [5, 24, 29, 29, 58]
    assert report["data"]["answers"] == str(cached[-1])
    joined = [json.loads(line)["prompt"]
              for line in Path(report["data"]["prompts"]).read_text().splitlines()]
    assert joined[-5:] == [f"w{i} w{i + 3} w{i + 7}" for i in range(50, 55)]
    assert main(args) == 0  # second run reuses the distilled draft: no new training
    assert "reusing the distilled draft" in capsys.readouterr().err
    again = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert again["before"] == report["before"] and again["train_steps"] == report["train_steps"]
    (tmp_path / "demo" / "mine.txt").write_text("a file of the user's")
    assert main(args + ["--fresh", "--draft", "target-layers:1", "--draft-quantize", "none",
                        "--sampled-temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "training data: " in err and "(cached" in err
    assert (tmp_path / "demo" / "mine.txt").read_text() == "a file of the user's"
    fresh = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert fresh["draft"]["spec"] == "target-layers:1"
    assert fresh["weights_duel"] is None and fresh["draft_weights"] == "none"  # none: not timed
    assert fresh["sampled"] is None  # --sampled-temperature 0: not timed, not saved
    saved = json.loads((tmp_path / "demo" / "run" / "final" / FILE).read_text())
    assert saved["draft_quantize"] == "none" and "sampled" not in saved
    assert list((tmp_path / "cache" / "demo-data").glob("*/teacher-topk-*.safetensors"))
    overlapping = ["--fresh", "--report-data", str(tmp_path / "heldout.jsonl")]
    assert main(args + overlapping) == 2  # reported on the prompts it chooses on: refused
    assert "report split must hold prompts" in capsys.readouterr().err
    assert (tmp_path / "demo" / "report.json").is_file()  # refused before --fresh removed it
    trained_on_report = ["--fresh", "--extra-prompts", str(tmp_path / "report.jsonl")]
    assert main(args + trained_on_report) == 2
    assert "--extra-prompts" in capsys.readouterr().err
    assert (tmp_path / "demo" / "report.json").is_file()
    on_policy = ["--fresh", "--distill.policy", "draft"]
    assert main(args + on_policy) == 2  # the demo's cached top-k needs fixed completions
    assert "set teacher_topk 0" in capsys.readouterr().err
    assert main(args + on_policy + ["--distill.teacher-topk", "0"]) == 0
    capsys.readouterr()
    with open(tmp_path / "extra.jsonl", "a") as extra:  # an edited prompt file is answered again
        extra.write(json.dumps({"prompt": "w90 w93 w97"}) + "\n")
    assert main(args + ["--fresh"]) == 0
    assert "the target answers 6 prompts of" in capsys.readouterr().err


def test_draft_choice_takes_the_best_prediction_and_the_deeper_one_in_a_near_tie():
    from distillspec.tools.demo import TIE, pick_candidate

    rows = [{"layers": 2, "predicted_speedup": 1.20}, {"layers": 3, "predicted_speedup": 1.19},
            {"layers": 4, "predicted_speedup": 1.10}]
    assert pick_candidate(rows)["layers"] == 3
    rows[1]["predicted_speedup"] = 1.20 * (1 - TIE) - 0.01
    assert pick_candidate(rows)["layers"] == 2


def test_demo_data_adds_sampled_answers_to_every_prompt_once(tmp_path, monkeypatch):
    """--answer-samples N: N answers sampled at T=1 per prompt of both parts, after the greedy
    ones, each seed its own; cached, so a second call generates nothing."""
    from distillspec.common.config import from_dict
    from distillspec.models.loading import load_model
    from distillspec.tools.configs import DemoConfig
    from distillspec.tools.demo_data import demo_data

    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path / "cache"))
    save_tiny(tmp_path / "target", layers=2, lm_scale=1.0)  # flat: samples differ from greedy
    for name, start, count in (("train.jsonl", 0, 6), ("extra.jsonl", 50, 3)):
        (tmp_path / name).write_text("".join(
            json.dumps({"prompt": f"w{i} w{i + 3} w{i + 7}"}) + "\n"
            for i in range(start, start + count)))
    config = from_dict(DemoConfig, {
        "prompt_pool": 0, "extra_prompts": str(tmp_path / "extra.jsonl"), "answer_samples": 2,
        "distill": {"target": str(tmp_path / "target"), "data": str(tmp_path / "train.jsonl"),
                    "max_new_tokens": 8},
    })
    target, tokenizer = load_model(config.distill.target, device="cpu", dtype="float32")
    data = demo_data(config, target, tokenizer)
    rows = [json.loads(line) for line in data.answers.read_text().splitlines()]
    greedy, first, second = rows[:9], rows[9:18], rows[18:]
    assert len(rows) == 27 and len(second) == 9
    prompts = [row["prompt_ids"] for row in greedy]
    assert [row["prompt_ids"] for row in first] == prompts == [row["prompt_ids"] for row in second]
    assert len(data.prompts.read_text().splitlines()) == 9  # samples add answers, not prompts
    completions = [[row["completion_ids"] for row in part] for part in (greedy, first, second)]
    assert completions[0] != completions[1] != completions[2] != completions[0]
    assert data.seconds > 0 and data.generation_minutes > 0
    again = demo_data(config, target, tokenizer)
    assert again.answers == data.answers and again.seconds == 0.0
    with pytest.raises(ValueError, match="answer_samples must be <= 8"):
        replace(config, answer_samples=9)


@pytest.mark.parametrize("temperature", [-0.5, 2.5, float("nan")])
def test_a_sampled_temperature_outside_the_servers_range_is_refused(temperature):
    from distillspec.tools.configs import DemoConfig

    with pytest.raises(ValueError, match=r"sampled_temperature must lie in \[0, 2\]"):
        DemoConfig(sampled_temperature=temperature)

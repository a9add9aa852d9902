"""The bench pipeline end to end on tiny local models (fast settings; not a timing test)."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny

from distillspec.bench import bench_main, markdown_table
from distillspec.config import BenchConfig


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
        gammas="1,3",
        temperatures="0,1",
        batch_sizes="1,2",
        max_new_tokens=6,
        repeats=1,
        out=str(setup / "out"),
        device="cpu",
        dtype="float32",
    )
    report = bench_main(config)
    assert [(s["temperature"], s["batch_size"]) for s in report["settings"]] == [
        (0.0, 1),
        (0.0, 2),
        (1.0, 1),
        (1.0, 2),
    ]
    for setting in report["settings"]:
        assert setting["recommended_gamma"] in (1, 3)
        for row in setting["by_gamma"]:
            assert row["ours_sd"]["new_tokens"] == 4 * 6
            assert 0 <= row["analytic_alpha"] <= 1 and row["block_efficiency"] >= 1
            assert row["predicted_speedup"] > 0 and row["cost_ratio_c"] > 0
            if setting["batch_size"] == 1:
                assert row["hf_assisted"]["new_tokens"] == 4 * 6
            else:
                assert row["hf_assisted"] is None and "batch size 1" in row["hf_assisted_note"]
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (setup / "out" / name).stat().st_size > 0
    table = markdown_table(report)
    assert "batch-1 only" in table and "★" in table


def test_spec_bench_answers(setup):
    config = BenchConfig(
        target=str(setup / "target"),
        draft="target-layers:1",
        prompts=str(setup / "prompts.jsonl"),
        num_prompts=1,
        gammas="2",
        temperatures="0",
        batch_sizes="1",
        max_new_tokens=5,
        repeats=1,
        out=str(setup / "spec"),
        question_file=str(setup / "question.jsonl"),
        device="cpu",
        dtype="float32",
    )
    bench_main(config)
    answers = [
        json.loads(line) for line in (setup / "spec" / "answers.jsonl").read_text().splitlines()
    ]
    choice = answers[0]["choices"][0]
    assert answers[0]["question_id"] == 7 and len(choice["turns"]) == 2
    assert all(n >= 1 for n in choice["new_tokens"]) and len(choice["wall_time"]) == 2
    assert sum(sum(turn) for turn in choice["accept_lengths"]) >= sum(choice["new_tokens"])


def test_bench_config_validation():
    with pytest.raises(ValueError, match="gammas"):
        BenchConfig(gammas="0,2")
    with pytest.raises(ValueError, match="temperatures"):
        BenchConfig(temperatures="-1")

"""The demo pipeline end to end on a tiny local model (seconds): measure, distil, measure."""

from __future__ import annotations

import json

from conftest import save_tiny

from distillspec.cli import main


def test_demo_runs_reuses_and_starts_fresh(tmp_path, capsys):
    save_tiny(tmp_path / "target", layers=3, lm_scale=10.0)
    for name, count in (("train.jsonl", 24), ("heldout.jsonl", 4)):
        (tmp_path / name).write_text(
            "".join(json.dumps({"prompt": f"w{i} w{i + 3} w{i + 7}"}) + "\n" for i in range(count))
        )
    args = [
        "demo",
        "--target",
        str(tmp_path / "target"),
        "--draft-init",
        "target-layers:1",
        "--data",
        str(tmp_path / "train.jsonl"),
        "--eval-data",
        str(tmp_path / "heldout.jsonl"),
        "--minutes",
        "0.03",
        "--out",
        str(tmp_path / "demo"),
        "--gammas",
        "1,2",
        "--max-new-tokens",
        "6",
        "--train-new-tokens",
        "6",
        "--eval-prompts",
        "4",
        "--speed-prompts",
        "2",
        "--eval-every",
        "2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--repeats",
        "1",
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    for side in ("before", "after"):
        assert {"alpha_t0", "alpha_t1", "target_tokens_per_s", "by_gamma", "best"} <= set(
            report[side]
        )
        assert [row["gamma"] for row in report[side]["by_gamma"]] == [1, 2]
    assert report["train_steps"] >= 1 and report["evals"][0]["eval"] == "start"
    for plot in ("alpha_over_training.png", "gamma_sweep.png"):
        assert (tmp_path / "demo" / plot).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| alpha (greedy, T=0) |" in out and "SD speed-up vs target alone" in out
    assert main(args) == 0  # second run reuses the distilled draft: no new training
    assert "reusing the distilled draft" in capsys.readouterr().out
    again = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert again["before"] == report["before"] and again["train_steps"] == report["train_steps"]
    assert (tmp_path / "demo" / "target-greedy.jsonl").is_file()  # the default policy's data
    assert main(args + ["--fresh", "--policy", "draft"]) == 0
    assert "demo: distilling (draft)" in capsys.readouterr().out
    assert not (tmp_path / "demo" / "target-greedy.jsonl").exists()
    assert main(args + ["--fresh", "--policy", "mixed-greedy"]) == 0
    assert "greedy answers" in capsys.readouterr().out

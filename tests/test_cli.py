"""The CLI end to end on a tiny local model folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import save_tiny

from distillspec.tools.cli import main


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli") / "target", layers=3)


def write_prompts(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def generate_json(capsys, *args) -> tuple[str, dict]:
    """Run the CLI (it must succeed); its stderr and its JSON output."""
    assert main(list(args)) == 0
    captured = capsys.readouterr()
    return captured.err, json.loads(captured.out)


def test_generate_json_one_object_per_prompt(model_folder, tmp_path, capsys):
    prompts = write_prompts(
        tmp_path / "p.jsonl",
        [
            json.dumps({"prompt": "w1 w2 w3"}),
            "",
            json.dumps({"prompt": "w7"}),
            json.dumps({"prompt": "w4 w5 w6 w7 w8"}),
        ],
    )
    code = main(
        [
            "generate",
            "--target",
            str(model_folder),
            "--draft",
            "target-layers:1",
            "--prompts",
            str(prompts),
            "--batch-size",
            "2",
            "--gamma",
            "3",
            "--max-new-tokens",
            "6",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--json",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["w1 w2 w3", "w7", "w4 w5 w6 w7 w8"]
    for line in lines:
        assert isinstance(line["text"], str) and 1 <= len(line["token_ids"]) <= 6
        metrics = line["metrics"]
        for key in (
            "acceptance_rate",
            "block_efficiency",
            "analytic_alpha",
            "accepted_tokens",
            "drafted_tokens",
            "per_position_acceptance",
            "accepted_length_histogram",
            "target_calls",
            "draft_calls",
            "batch_draft_time_s",
            "batch_target_time_s",
        ):
            assert key in metrics


def test_plain_decoding_and_text_output(model_folder, capsys):
    code = main(
        [
            "generate",
            "--target",
            str(model_folder),
            "--draft",
            "none",
            "--prompt",
            "w1 w2",
            "--max-new-tokens",
            "4",
            "--temperature",
            "1",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "tokens in" in out and "tok/s" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gamma", "0"], "gamma must be an integer >= 1"),
        (["--epsilon", "2", "--lenience", "exp"], "epsilon must be in (0, 1]"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--tree", "0,x"], "tree must be '' (chain)"),
    ],
)
def test_bad_knobs_exit_2_with_message(model_folder, capsys, args, message):
    code = main(["generate", "--target", str(model_folder), "--prompt", "w1"] + args)
    assert code == 2
    assert message in capsys.readouterr().err


def test_malformed_prompt_file_names_file_and_line(model_folder, tmp_path, capsys):
    bad = write_prompts(tmp_path / "bad.jsonl", [json.dumps({"prompt": "w1"}), "{oops"])
    code = main(["generate", "--target", str(model_folder), "--prompts", str(bad)])
    assert code == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    missing = write_prompts(tmp_path / "missing.jsonl", [json.dumps({"text": "w1"})])
    assert main(["generate", "--target", str(model_folder), "--prompts", str(missing)]) == 2
    assert f'{missing}:1: missing or empty "prompt"' in capsys.readouterr().err


def test_unknown_model_path(capsys, tmp_path):
    assert main(["generate", "--target", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "not found" in capsys.readouterr().err


def test_python_dash_m_matches_the_command():
    out = subprocess.run(
        [sys.executable, "-m", "distillspec", "generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--target",
        "--draft",
        "--prompts",
        "--gamma",
        "--lenience",
        "--epsilon",
        "--top-k",
        "--top-p",
        "--max-new-tokens",
        "--batch-size",
        "--json",
        "--dtype",
    ):
        assert flag in out


def test_cli_reference_is_up_to_date(monkeypatch):
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("COLUMNS", "100")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_cli", root / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "cli.md").read_text() == module.cli_reference(), (
        "docs/cli.md is stale: run COLUMNS=100 python docs/gen_cli.py > docs/cli.md"
    )


def test_generate_uses_the_setting_measured_for_the_draft(model_folder, tmp_path, capsys):
    """A draft folder's saved fastest setting applies with the target and on the machine kind it
    was measured with, unless the user gives --gamma (even the default value); a setting
    measured elsewhere, or with another target, is ignored."""
    import torch

    from distillspec.models.recommended import FILE, recommended_for, save_recommended

    draft = save_tiny(tmp_path / "draft", layers=1)
    cpu = torch.device("cpu")
    save_recommended(draft, target=str(model_folder), gamma=2, confidence_threshold=0.3,
                     device=cpu, dtype=torch.float32, measured={"speedup": 1.4})
    assert recommended_for(draft, str(model_folder), cpu, torch.bfloat16) is None  # other dtype
    assert recommended_for(draft, "another-target", cpu, torch.float32) is None
    base = ["generate", "--target", str(model_folder), "--draft", str(draft), "--prompt", "w1 w2",
            "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu", "--json"]

    def run(*extra) -> tuple[str, int]:
        err, out = generate_json(capsys, *base, *extra)
        histogram = out["metrics"]["accepted_length_histogram"]
        return err, len(histogram) - 1  # the gamma the decoder ran with

    err, gamma = run()
    assert "gamma 2, confidence threshold 0.3 (measured fastest" in err and gamma == 2
    err, gamma = run("--gamma", "4")  # the default value, given explicitly: the user's choice
    assert "measured fastest" not in err and gamma == 4
    saved = json.loads((draft / FILE).read_text())
    (draft / FILE).write_text(json.dumps({**saved, "machine": "cpu:another CPU:2 threads"}))
    err, gamma = run()
    assert "measured fastest" not in err and gamma == 4
    (draft / FILE).write_text(json.dumps({**saved, "gamma": 0}))  # not a valid setting: ignored
    err, gamma = run()
    assert "measured fastest" not in err and gamma == 4


def test_generate_uses_a_measured_tree_and_tree_flags(model_folder, tmp_path, capsys):
    """A saved tree applies like a saved gamma; --tree given (even empty) is the user's choice;
    a saved tree that does not parse is ignored; a bad --tree is refused before loading."""
    import torch

    from distillspec.models.recommended import FILE, save_recommended

    draft = save_tiny(tmp_path / "draft", layers=1)
    save_recommended(draft, target=str(model_folder), gamma=1, confidence_threshold=0.0,
                     tree="6:2", device=torch.device("cpu"), dtype=torch.float32,
                     measured={"speedup": 1.3})
    base = ["generate", "--target", str(model_folder), "--draft", str(draft), "--prompt", "w1 w2",
            "--max-new-tokens", "12", "--dtype", "float32", "--device", "cpu", "--json"]

    def run(*extra) -> tuple[str, dict]:
        return generate_json(capsys, *base, *extra)

    err, tree_out = run()
    assert "tree 6:2 (measured fastest for this draft on this machine, timed greedy;" in err
    assert len(tree_out["metrics"]["accepted_length_histogram"]) == 3  # depth 2 per block
    err, chain_out = run("--tree", "")
    assert "measured fastest" not in err
    assert chain_out["text"] == tree_out["text"]  # greedy: the same tokens either way
    saved = json.loads((draft / FILE).read_text())
    (draft / FILE).write_text(json.dumps({**saved, "tree": "0.1"}))  # no parent: ignored
    err, _ = run()
    assert "measured fastest" not in err
    assert main([*base, "--tree", "1.0"]) == 2
    assert "has no parent 1" in capsys.readouterr().err


def test_generate_uses_a_measured_prompt_lookup(model_folder, tmp_path, capsys):
    """A saved prompt lookup applies with its tree (greedy); --lookup given (even 0) is the
    user's choice; a saved lookup that is not a whole number in range voids the setting."""
    import torch

    from distillspec.models.recommended import FILE, save_recommended

    draft = save_tiny(tmp_path / "draft", layers=1)
    save_recommended(draft, target=str(model_folder), gamma=1, confidence_threshold=0.0,
                     tree="4:1", lookup=6, device=torch.device("cpu"), dtype=torch.float32,
                     measured={"speedup": 1.3})
    base = ["generate", "--target", str(model_folder), "--draft", str(draft), "--prompt",
            "w1 w2 w3 w4 w1 w2 w3 w4 w1 w2", "--max-new-tokens", "24", "--dtype", "float32",
            "--device", "cpu", "--json"]

    def run(*extra) -> tuple[str, dict]:
        return generate_json(capsys, *base, *extra)

    err, looked = run()
    assert "tree 4:1, prompt lookup 6 (measured fastest" in err
    assert looked["metrics"]["lookup_blocks"] > 0
    err, plain_tree = run("--lookup", "0")
    assert "measured fastest" not in err and plain_tree["metrics"]["lookup_blocks"] == 0
    assert plain_tree["text"] == looked["text"]  # greedy, float32: the same tokens either way
    saved = json.loads((draft / FILE).read_text())
    for bad in (-1, 65, True, 2.5):
        (draft / FILE).write_text(json.dumps({**saved, "lookup": bad}))
        err, _ = run()
        assert "measured fastest" not in err


def test_generate_at_a_temperature_uses_the_setting_timed_sampled(model_folder, tmp_path,
                                                                   capsys, monkeypatch):
    """The demo's sampled setting applies at T > 0 (greedy keeps the greedy one); --draft auto
    keeps plain decoding at T > 0 where the draft measured slower sampled, not greedy; a
    sampled entry that is not a valid setting is ignored (the greedy one applies)."""
    import torch

    from distillspec.models.recommended import save_recommended
    from distillspec.models.registry import record_distilled_draft

    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path / "cache"))
    draft = save_tiny(tmp_path / "draft", layers=1)
    record_distilled_draft(str(model_folder), draft)

    def save(sampled_speedup: float, **sampled) -> None:
        save_recommended(draft, target=str(model_folder), gamma=1, confidence_threshold=0.0,
                         tree="6:2", device=torch.device("cpu"), dtype=torch.float32,
                         measured={"speedup": 1.3},
                         sampled={"temperature": 1.0, "gamma": 4, "confidence_threshold": 0.0,
                                  "tree": "", "speedup": sampled_speedup, **sampled})

    def run(draft_spec: str, temperature: str) -> tuple[str, dict]:
        assert main(["generate", "--target", str(model_folder), "--draft", draft_spec,
                     "--prompt", "w1 w2", "--max-new-tokens", "12", "--temperature", temperature,
                     "--dtype", "float32", "--device", "cpu", "--json"]) == 0
        captured = capsys.readouterr()
        return captured.err, json.loads(captured.out)["metrics"]

    save(1.2)
    err, metrics = run(str(draft), "1")
    assert "gamma 4, confidence threshold 0 (measured fastest" in err and "timed at T=1" in err
    assert len(metrics["accepted_length_histogram"]) == 5  # a chain of 4, not the tree 6:2
    err, metrics = run(str(draft), "0")
    assert "tree 6:2 (measured fastest" in err and "timed greedy" in err
    assert len(metrics["accepted_length_histogram"]) == 3  # the tree: depth 2
    save(0.9)
    err, metrics = run("auto", "0.7")
    assert "measured 0.90x the target alone on this machine at its best setting at T=1" in err
    assert metrics["draft_calls"] == 0
    err, metrics = run("auto", "0")
    assert "measured 1.30x here" in err and metrics["draft_calls"] > 0
    save(1.2, tree="0.1")  # no parent: not a setting, the greedy one applies
    err, _ = run(str(draft), "1")
    assert "tree 6:2 (measured fastest" in err and "timed greedy" in err


@pytest.mark.parametrize(("entry", "used", "speedup"), [
    ({}, True, 1.2),
    ({"speedup": float("nan")}, True, None),  # no speed-up to judge by: used, not judged
    ({"speedup": True}, True, None),
    ({"gamma": True}, False, None),  # a boolean is not a gamma
    ({"confidence_threshold": float("nan")}, False, None),
    ({"temperature": 0}, False, None),  # a sampled setting timed greedy is not one
])
def test_a_saved_sampled_setting_is_used_only_when_valid(tmp_path, entry, used, speedup):
    import torch

    from distillspec.models.recommended import save_recommended, saved_setting, setting_at

    sampled = {"temperature": 1.0, "gamma": 2, "confidence_threshold": 0.0, "tree": "",
               "speedup": 1.2, **entry}
    save_recommended(tmp_path, target="t", gamma=3, confidence_threshold=0.0, tree="4:1",
                     device=torch.device("cpu"), dtype=torch.float32, measured={"speedup": 1.3},
                     sampled=sampled)
    saved = saved_setting(tmp_path)
    at_t1 = setting_at(saved, 1.0)
    assert setting_at(saved, 0.0) == {"gamma": 3, "confidence_threshold": 0.0, "tree": "4:1",
                                      "lookup": 0, "speedup": 1.3}
    if used:
        assert at_t1["gamma"] == 2 and at_t1["tree"] == "" and at_t1["speedup"] == speedup
    else:
        assert at_t1 == setting_at(saved, 0.0)


def test_auto_draft_falls_back_to_plain_decoding_where_it_measured_slower(
        model_folder, tmp_path, capsys, monkeypatch):
    """--draft auto uses the demo's draft, except where the demo measured SD slower than the
    target alone on this machine kind: there plain decoding is the faster choice."""
    import torch

    from distillspec.models.recommended import save_recommended
    from distillspec.models.registry import record_distilled_draft

    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path / "cache"))
    draft = save_tiny(tmp_path / "draft", layers=1)
    record_distilled_draft(str(model_folder), draft)
    base = ["generate", "--target", str(model_folder), "--prompt", "w1 w2", "--max-new-tokens",
            "4", "--dtype", "float32", "--device", "cpu", "--json"]
    cpu = torch.device("cpu")
    save_recommended(draft, target=str(model_folder), gamma=2, confidence_threshold=0.0,
                     device=cpu, dtype=torch.float32, measured={"speedup": 1.25})
    assert main(base) == 0
    captured = capsys.readouterr()
    assert f"draft: {draft} (distilled by `distillspec demo`, measured 1.25x here)" in captured.err
    assert json.loads(captured.out)["metrics"]["draft_calls"] > 0
    save_recommended(draft, target=str(model_folder), gamma=1, confidence_threshold=0.0,
                     device=cpu, dtype=torch.float32, measured={"speedup": 0.9})
    assert main(base) == 0
    captured = capsys.readouterr()
    assert "measured 0.90x the target alone" in captured.err and "plain decoding" in captured.err
    assert json.loads(captured.out)["metrics"]["draft_calls"] == 0

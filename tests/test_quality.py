"""Task quality (``distillspec eval``): the pure metrics, the code sandbox, problem files, the
config's refusals, the stop watcher and scorer on a tiny model, and the command end to end."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import perturbed_copy, save_tiny, tiny_model, tiny_tokenizer

from distillspec.decoding.quality import (
    agreement,
    first_difference,
    mean_pass_at_k,
    mean_per_token,
    pass_at_k,
    truncate_at_stops,
)
from distillspec.tools import sandbox
from distillspec.tools.code_problems import load_problems, read_problem_file
from distillspec.tools.eval_config import EvalConfig, EvalSetup
from distillspec.tools.sandbox import SandboxLimits, run_python

# -- pure metrics ----------------------------------------------------------------------------------


def reference_pass_at_k(n, c, k):
    """The definition itself: 1 - C(n - c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_is_chen_et_al_unbiased_estimator():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c / n
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: every draw of 3 holds a correct one
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(reference_pass_at_k(n, c, k), abs=1e-12)
    assert mean_pass_at_k([(1, 1), (1, 0), (1, 1), (1, 0)], 1) == 0.5


@pytest.mark.parametrize("n,c,k,message", [
    (3, 1, 4, "1 <= k <= n"), (3, 1, 0, "1 <= k <= n"), (3, 4, 1, "impossible"),
    (3, -1, 1, "integers"), (True, 1, 1, "integers"), (3.0, 1, 1, "integers"),
])
def test_pass_at_k_refuses_impossible_counts(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_agreement_on_hand_made_sequences():
    outputs = [[1, 2, 3], [1, 2, 4], [1], [7], [1, 2, 3, 4]]
    references = [[1, 2, 3], [1, 2, 3], [1, 2], [5], [1, 2, 3]]
    assert [first_difference(o, r) for o, r in zip(outputs, references)] == [3, 2, 1, 0, 3]
    result = agreement(outputs, references)
    assert result.rows == 5
    assert result.exact_match == pytest.approx(1 / 5)  # only the first; a longer output differs
    assert result.mean_first_difference == pytest.approx(9 / 5)
    assert result.mean_prefix_fraction == pytest.approx((1 + 2 / 3 + 1 / 2 + 0 + 1) / 5)
    assert agreement([[], [3]], [[], []]).mean_prefix_fraction == 0.5
    with pytest.raises(ValueError, match="2 outputs but 1 references"):
        agreement([[1], [2]], [[1]])


def test_mean_per_token_averages_rows_first():
    # row means -2 and -4; a token-weighted mean would give -2.4
    assert mean_per_token([[-1, -1, -1, -5], [-4], []]) == pytest.approx(-3.0)
    assert mean_per_token([[], []]) is None


def test_truncate_at_the_earliest_stop():
    text = "    return a + b\n\ndef other():\n#x"
    assert truncate_at_stops(text, ("\n#", "\ndef")) == "    return a + b\n"
    assert truncate_at_stops("no stop", ("\ndef",)) == "no stop"
    with pytest.raises(ValueError, match="empty"):
        truncate_at_stops("x", ("",))


# -- the sandbox -----------------------------------------------------------------------------------

FAST = SandboxLimits(timeout_s=2.0, memory_mb=256, max_processes=8)


@pytest.fixture
def workdirs(monkeypatch):
    """The temporary folders the sandbox runs in (to find processes left behind)."""
    made = []
    original = sandbox.tempfile.mkdtemp

    def recording(**kwargs):
        made.append(original(**kwargs))
        return made[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", recording)
    return made


def processes_of(workdir: str) -> list[int]:
    """Live processes started in ``workdir`` (their environment says HOME=workdir)."""
    marker = f"HOME={workdir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def run_bounded(source: str, limits: SandboxLimits = FAST):
    started = time.monotonic()
    result = run_python(source, limits)
    return result, time.monotonic() - started


def test_a_passing_program_passes_and_the_isolation_is_reported():
    result, _ = run_bounded("import math\nassert math.gcd(12, 18) == 6\nprint('fine')\n")
    assert result.passed and result.status == "passed" and "fine" in result.output
    assert set(result.isolation) >= {"network", "pid_namespace", "process_limit"}


def test_an_infinite_loop_times_out(workdirs):
    result, seconds = run_bounded("while True:\n    pass\n")
    assert result.status == "timeout" and not result.passed
    assert seconds < FAST.timeout_s + 2
    assert processes_of(workdirs[0]) == []


def test_a_fork_bomb_fails_within_its_limits_and_nothing_survives(workdirs):
    bomb = ("import os\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n")
    result, seconds = run_bounded(bomb)
    assert not result.passed and result.status in ("timeout", "failed", "killed")
    assert seconds < FAST.timeout_s + 3
    time.sleep(0.2)
    assert processes_of(workdirs[0]) == []


def test_a_process_that_leaves_the_group_is_killed_too(workdirs):
    """setsid() escapes a process-group kill; the PID namespace (where there is one) or the
    group kill of everything still inside must leave nothing running."""
    escape = ("import os, time\n"
              "if os.fork() == 0:\n"
              "    os.setsid()\n"
              "    time.sleep(60)\n"
              "time.sleep(60)\n")
    result, seconds = run_bounded(escape)
    assert result.status == "timeout" and seconds < FAST.timeout_s + 2
    time.sleep(0.2)
    if not result.isolation.get("pid_namespace"):
        pytest.skip("no PID namespace here: a setsid() escapee is a documented limit")
    assert processes_of(workdirs[0]) == []


def test_a_memory_hog_fails_on_its_memory_limit():
    """The hog must meet the memory limit, not the clock: touching 256 MB took up to 2.5 s on a
    slow VM (first-touch page faults), so it gets the smallest limit and a clock it cannot hit."""
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n"
    limits = SandboxLimits(timeout_s=20.0, memory_mb=64, max_processes=8)
    result, seconds = run_bounded(hog, limits)
    assert result.status == "memory" and not result.passed
    assert "MemoryError" in result.detail and seconds < limits.timeout_s


def test_network_and_writes_outside_the_folder_are_refused(tmp_path):
    outside = tmp_path / "written-by-the-sandbox"
    for source in (
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        f"open({str(outside)!r}, 'w').write('x')\n",
        "import subprocess\nsubprocess.run(['true'])\n",
    ):
        result, _ = run_bounded(source)
        assert result.status == "failed", source
    assert not outside.exists()
    inside, _ = run_bounded("open('scratch.txt', 'w').write('x')\nprint(open('scratch.txt').read())")
    assert inside.passed and "x" in inside.output


def test_sandbox_limits_are_validated():
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=8)


# -- problems and pass@1 on known answers -------------------------------------------------------


@pytest.fixture(scope="module")
def heldout():
    return load_problems("builtin:humaneval:heldout")


def test_builtin_heldout_problems_are_the_training_split_s_heldout(heldout):
    from distillspec.training.builtin_data import builtin_dataset_items

    keys = [item.key for item in builtin_dataset_items("builtin:humaneval:heldout")]
    assert [p.task_id for p in heldout] == keys and len(keys) == 16
    assert len(load_problems("builtin:humaneval:all")) == 164
    assert load_problems("builtin:humaneval") == heldout
    assert all(p.test and p.entry_point and p.canonical_solution for p in heldout)


def test_pass_at_1_is_one_for_canonical_solutions_and_zero_for_wrong_ones(heldout):
    problems = heldout[:4]
    good = sandbox.run_many([p.program(p.canonical_solution) for p in problems], FAST, workers=2)
    assert [r.status for r in good] == ["passed"] * 4
    assert mean_pass_at_k([(1, int(r.passed)) for r in good], 1) == 1.0
    # wrong answers: an empty body, and each problem given its neighbour's solution
    wrong = ["    return None\n"] + [problems[(i + 1) % 4].canonical_solution for i in range(1, 4)]
    bad = sandbox.run_many([p.program(w) for p, w in zip(problems, wrong)], FAST, workers=2)
    assert not any(r.passed for r in bad)
    assert mean_pass_at_k([(1, int(r.passed)) for r in bad], 1) == 0.0


GOOD_LINE = {"task_id": "x/0", "prompt": "def f(a):\n", "test": "def check(c):\n    assert c(1) == 1\n",
             "entry_point": "f"}


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({**GOOD_LINE, "test": ""}), 'missing or empty "test"'),
    (json.dumps({k: v for k, v in GOOD_LINE.items() if k != "entry_point"}), '"entry_point"'),
    (json.dumps({**GOOD_LINE, "entry_point": "f(x)"}), "function name"),
    (json.dumps({**GOOD_LINE, "test": "assert True\n"}), "check"),
    (json.dumps(GOOD_LINE), "repeats"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_problem_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(GOOD_LINE) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        read_problem_file(path)
    assert f"{path}:3" in str(error.value)


def test_a_user_problem_file_runs_like_humaneval(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({**GOOD_LINE, "task_id": 7}) + "\n")
    (problem,) = load_problems(str(path))
    assert problem.task_id == "7" and problem.source == f"{path}:1"
    assert run_python(problem.program("    return a\n"), FAST).passed
    assert not run_python(problem.program("    return -a\n"), FAST).passed
    with pytest.raises(ValueError, match="Unknown code problem set"):
        load_problems("builtin:mbpp")


# -- setups and the config -------------------------------------------------------------------------


def test_setups_parse_into_engine_settings():
    lossy = EvalSetup.parse("sd:4:exp=0.5:threshold=0.3").speculation
    assert (lossy.gamma, lossy.lenience, lossy.epsilon, lossy.confidence_threshold) == (
        4, "exp", 0.5, 0.3)
    assert EvalSetup.parse("target").speculation is None
    assert EvalSetup.parse("tree:15:2").speculation.tree == "15:2"
    assert EvalSetup.parse("tree:0/1/0.0").speculation.tree == "0/1/0.0"


@pytest.mark.parametrize("setup,message", [
    ("sd", "number of draft tokens"), ("sd:x", "number of draft tokens"),
    ("sd:4:cubic=0.5", "unknown option"), ("sd:4:exp=2", "epsilon must be in"),
    ("sd:4:exp=0.5:lin=0.5", "at most one lenience"), ("tree:", "empty"),
    ("plain", "unknown kind"), ("sd:0", "gamma must be"),
])
def test_bad_setups_say_the_grammar(setup, message):
    with pytest.raises(ValueError, match=message) as error:
        EvalSetup.parse(setup)
    assert "sd:G" in str(error.value)


@pytest.mark.parametrize("values,message", [
    (dict(setups=["sd:4:exp=0.5"]), "lenience changes nothing"),
    (dict(samples=3), "temperature 0"),
    (dict(samples=2, pass_k=[1, 5], sampling={"temperature": 1.0}), "pass_k"),
    (dict(setups=["target", "target"]), "twice"),
    (dict(draft="none"), "need a draft"),
    (dict(setups=[]), "at least one"),
    (dict(setups=["target"], compare_draft="target-layers:1"), "no setup uses a draft"),
])
def test_config_refuses_meaningless_combinations(values, message):
    from distillspec.common.config import from_dict

    with pytest.raises(ValueError, match=message):
        from_dict(EvalConfig, values)


# -- the engine parts on a tiny model ------------------------------------------------------------


def test_stop_watcher_cuts_every_setup_at_the_same_token():
    """Greedy answers cut at a stop string keep exactly the same tokens under plain decoding
    and SD, although SD may emit a few more before the row is cancelled."""
    from distillspec.decoding.params import SamplingConfig
    from distillspec.tools.eval_quality import Item, Row, decode_rows

    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.05)
    tokenizer = tiny_tokenizer()
    items = [Item("a", [1, 5, 6, 7]), Item("b", [1, 9, 4])]
    rows = [Row(0, 0, 0), Row(1, 0, 1)]
    common = dict(tokenizer=tokenizer, sampling=SamplingConfig(), max_new_tokens=16,
                  batch_size=2, stop_ids=frozenset(), seed=0)
    free = decode_rows(target, draft, EvalSetup.parse("target"), items, rows, stops=(), **common)
    full = free.answers[0].tokens
    stop = " " + tokenizer.decode([full[5]])  # the 6th token of row 0's answer (word-level)

    def text(tokens):  # what the word-level tokenizer decodes, without a model
        return "".join(" " + tokenizer.decode([t]) for t in tokens)

    end = next(e for e in range(1, len(full) + 1) if stop in text(full[:e]))
    runs = [decode_rows(target, draft, EvalSetup.parse(s), items, rows, stops=(stop,), **common)
            for s in ("target", "sd:4")]
    for run in runs:
        answer = run.answers[0]
        assert answer.finish == "stop" and answer.tokens == full[:end]
        assert answer.text == text(full[:end]).split(stop)[0]
        assert answer.emitted >= len(answer.tokens)
    assert runs[0].answers[1].tokens == runs[1].answers[1].tokens


def test_log_likelihoods_match_a_direct_computation_with_ragged_rows():
    from distillspec.tools.eval_quality import target_log_likelihoods

    target = tiny_model("llama", seed=3).float()
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 4, 4]]
    answers = [[10, 11], [12, 13, 14, 15], [16]]
    scores = target_log_likelihoods(target, prompts, answers, pad_id=0, batch_size=3)
    for prompt, answer, got in zip(prompts, answers, scores):
        ids = torch.tensor([prompt + answer])
        log_probs = target(ids).logits[0].float().log_softmax(-1)
        expected = [log_probs[len(prompt) - 1 + t, token].item() for t, token in enumerate(answer)]
        assert got == pytest.approx(expected, abs=1e-4)


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("eval") / "target", layers=3)


def test_eval_code_end_to_end(model_folder, tmp_path, capsys):
    from distillspec.tools.cli import main

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({**GOOD_LINE, "task_id": f"x/{i}"}) + "\n"
                                for i in range(3)))
    out = tmp_path / "out"
    code = main(["eval", "--target", str(model_folder), "--draft", "target-layers:1",
                 "--data", str(problems), "--setups", "target,sd:2,tree:4:2",
                 "--max-new-tokens", "10", "--dtype", "float32", "--device", "cpu",
                 "--out", str(out), "--timeout-s", "3"])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert [e["setup"] for e in report["setups"]] == ["target", "sd:2", "tree:4:2"]
    target, chain, tree = report["setups"]
    assert report["reference"] == "the target setup (greedy)"
    for entry in report["setups"]:
        # greedy SD and trees are lossless: the target's own answers, token for token
        assert entry["agreement"]["exact_match"] == 1.0
        assert entry["mean_log_likelihood"] == pytest.approx(target["mean_log_likelihood"])
        assert entry["pass_at_k"] == {"1": 0.0}  # a random model writes no working code
        assert entry["statuses"] == {"failed": 3} and entry["tokens_per_s"] > 0
    assert target["block_efficiency"] is None and chain["block_efficiency"] >= 1.0
    assert tree["acceptance_rate"] is not None and report["sandbox"]["isolation"]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and all(line["status"] == "failed" for line in lines)
    assert "| sd:2 |" in (out / "eval.md").read_text() and "pass@1" in capsys.readouterr().out


def test_eval_text_sampled_with_a_lossy_setup(model_folder, tmp_path):
    from distillspec.tools.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ("w1 w2 w3", "w7", "w4 w5 w6 w7 w8")))
    out = tmp_path / "out"
    code = main(["eval", "--task", "text", "--target", str(model_folder), "--draft",
                 "target-layers:1", "--data", str(prompts), "--setups", "target,sd:3,sd:3:exp=0.3",
                 "--temperature", "1", "--samples", "2", "--max-new-tokens", "8", "--batch-size",
                 "2", "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["reference"] == "a separate greedy run of the target"
    assert report["sandbox"] is None and report["items"] == 3
    for entry in report["setups"]:
        assert "pass_at_k" not in entry and entry["agreement"]["rows"] == 6
        assert entry["mean_log_likelihood"] < 0
    lossless, lossy = report["setups"][1:]
    assert lossy["lenience"] == "exp" and lossy["epsilon"] == 0.3
    assert lossy["acceptance_rate"] > lossless["acceptance_rate"]
    assert "## Lenience curves" in (out / "eval.md").read_text()
    [choice] = report["lenience_choice"]  # text: judged by the target's log-likelihood
    assert choice["lossless"] == "sd:3" and choice["metric"] == "log-lik/token"
    assert choice["chosen"] in (None, "sd:3:exp=0.3")  # decided by the measured speeds
    assert (choice["chosen"] is None) == ("why" in choice)
    assert "## Lenience choice" in (out / "eval.md").read_text()
    assert (out / "quality_speed.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "quality_speed_compare.png").exists()


def _entry(setup, role, epsilon=1.0, lenience="none", gamma=3, speedup=1.2, tau=2.0, passed=0.5,
           tps=10.0):
    return {"setup": setup, "draft_role": role, "kind": "target" if role is None else "sd",
            "tokens_per_s": tps,
            "gamma": None if role is None else gamma, "tree": None, "confidence_threshold": 0.0,
            "lenience": lenience, "epsilon": epsilon, "speedup_vs_target": speedup,
            "block_efficiency": tau, "pass_at_k": {"1": passed}, "mean_log_likelihood": -0.4}


def test_lenience_curves_start_at_their_own_lossless_setup_and_run_to_the_most_lenient(tmp_path):
    """Curves group by draft role, drafting setting and f; the lossless setup of the same role
    and gamma opens each (epsilon 1, where every f is the identity), points by falling epsilon."""
    from distillspec.tools.eval_quality import lenience_curves, lenience_lines, write_plots

    setups = [_entry("target", None, speedup=1.0, tau=None),
              _entry("sd:3", "draft"), _entry("sd:3 [compare]", "compare", speedup=1.1),
              _entry("sd:3:exp=0.2", "draft", 0.2, "exp", speedup=1.5),
              _entry("sd:3:exp=0.5", "draft", 0.5, "exp", speedup=1.3),
              _entry("sd:3:lin=0.5 [compare]", "compare", 0.5, "lin"),
              _entry("sd:4:exp=0.5", "draft", 0.5, "exp", gamma=4)]
    report = {"task": "code", "setups": setups, "draft": "d", "compare_draft": "c"}
    curves = {(c["role"], c["lenience"], c["points"][-1]["gamma"]): c
              for c in lenience_curves(report)}
    assert set(curves) == {("draft", "exp", 3), ("compare", "lin", 3), ("draft", "exp", 4)}
    assert [p["setup"] for p in curves["draft", "exp", 3]["points"]] == [
        "sd:3", "sd:3:exp=0.5", "sd:3:exp=0.2"]
    assert [p["setup"] for p in curves["compare", "lin", 3]["points"]] == [
        "sd:3 [compare]", "sd:3:lin=0.5 [compare]"]
    # no lossless sd:4 was run: that curve has only its lossy point and no base
    assert curves["draft", "exp", 4]["base"] is None
    assert len(curves["draft", "exp", 4]["points"]) == 1
    lines = "\n".join(lenience_lines(report))
    assert "| draft | sd:3 | exp | 1: 1.20× / 2.00 / 0.500 / -0.400; 0.5: 1.30×" in lines
    assert "| draft | sd:4 | exp | 0.5: 1.20×" in lines
    written = write_plots(report, lambda name: tmp_path / name)
    assert written == ["quality_speed.png", "quality_speed_compare.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)
    # a later run into the same folder without lossy setups leaves no stale figure behind
    no_lossy = {**report, "setups": setups[:3]}
    assert lenience_curves(no_lossy) == [] and lenience_lines(no_lossy) == []
    assert write_plots(no_lossy, lambda name: tmp_path / name) == []
    assert not any((tmp_path / name).exists() for name in written)


def test_paired_difference_matches_the_textbook_formula():
    import statistics

    from distillspec.decoding.quality import paired_difference

    values, baselines = [1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 1]
    differences = [v - b for v, b in zip(values, baselines)]
    half = 1.96 * statistics.stdev(differences) / math.sqrt(len(differences))
    result = paired_difference(values, baselines)
    assert result.rows == 6 and result.mean == pytest.approx(statistics.mean(differences))
    assert (result.low, result.high) == pytest.approx((result.mean - half, result.mean + half))
    assert paired_difference([0.5], [0.25]).to_dict() == {
        "rows": 1, "mean": 0.25, "low": None, "high": None}  # one pair: no spread to estimate
    with pytest.raises(ValueError, match="2 values but 1 baselines"):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match="at least one pair"):
        paired_difference([], [])


def _sample_lines(setup, passed):
    return [{"setup": setup, "key": f"P{i // 2}", "sample": i % 2,
             "status": "passed" if ok else "failed"} for i, ok in enumerate(passed)]


def test_lenience_choice_takes_the_fastest_lossy_setup_within_the_tolerance():
    """Per lossless setup: the fastest lossy setup of its curves that is faster and whose pass@1
    (from the rows) is at most the tolerance below lossless; the paired difference is averaged
    per problem, its interval taken over problems."""
    from distillspec.tools.eval_quality import lenience_choice, lenience_choice_lines

    setups = [_entry("sd:3", "draft", tps=10.0),
              _entry("sd:3:exp=0.5", "draft", 0.5, "exp", tps=13.0),
              _entry("sd:3:lin=0.5", "draft", 0.5, "lin", tps=12.0),
              _entry("sd:3:exp=0.2", "draft", 0.2, "exp", tps=15.0),
              _entry("sd:3 [compare]", "compare", tps=10.0),
              _entry("sd:3:exp=0.5 [compare]", "compare", 0.5, "exp", tps=9.0)]
    report = {"task": "code", "setups": setups}
    samples = (_sample_lines("sd:3", [1, 1, 0, 0]) + _sample_lines("sd:3:exp=0.5", [1, 0, 1, 0])
               + _sample_lines("sd:3:lin=0.5", [1, 1, 1, 0])
               + _sample_lines("sd:3:exp=0.2", [0, 1, 0, 0])
               + _sample_lines("sd:3 [compare]", [1, 0, 0, 0])
               + _sample_lines("sd:3:exp=0.5 [compare]", [1, 0, 0, 0]))
    draft, compare = lenience_choice(report, samples, tolerance=0.01)
    assert (draft["lossless"], draft["chosen"], draft["candidates"]) == ("sd:3", "sd:3:exp=0.5", 3)
    assert draft["metric"] == "pass@1" and draft["speedup_vs_lossless"] == pytest.approx(1.3)
    assert draft["quality"] == (0.5, 0.5)
    # per problem: P0 (1-1 + 0-1) / 2 = -0.5, P1 (1-0 + 0-0) / 2 = +0.5; over the 2 problems
    half = 1.96 * math.sqrt(0.5) / math.sqrt(2)
    assert (draft["paired"]["items"], draft["paired"]["rows"]) == (2, 4)
    assert draft["paired"]["mean"] == 0.0
    assert (draft["paired"]["low"], draft["paired"]["high"]) == pytest.approx((-half, half))
    # the compare draft's only lossy setup is slower than its lossless one: nothing chosen
    assert compare["lossless"] == "sd:3 [compare]" and compare["chosen"] is None
    assert compare["why"] == "none of 1 is faster within the tolerance"
    # a looser tolerance admits the faster, worse setup: P0 -0.5, P1 0 -> -0.25
    loose = lenience_choice(report, samples, tolerance=0.3)[0]
    assert loose["chosen"] == "sd:3:exp=0.2" and loose["paired"]["mean"] == -0.25
    lines = "\n".join(lenience_choice_lines({**report, "lenience_choice": [draft, compare]}))
    assert "| draft | sd:3 | sd:3:exp=0.5 (of 3) | 1.30× | 2.00 vs 2.00 | 0.500 vs 0.500 |" in lines
    assert "(2 items, 4 rows) |" in lines
    assert "| compare | sd:3 [compare] | none of 1 is faster within the tolerance |" in lines
    assert lenience_choice_lines(report) == []  # a report without a choice: no section


def test_lenience_choice_edge_cases_zero_quality_text_rows_and_no_speed():
    from distillspec.tools.eval_quality import lenience_choice

    # pass@1 0 everywhere is a quality like any other (not "missing")
    setups = [_entry("sd:2", "draft", tps=5.0), _entry("sd:2:exp=0.5", "draft", 0.5, "exp", tps=6.0)]
    zeros = _sample_lines("sd:2", [0, 0]) + _sample_lines("sd:2:exp=0.5", [0, 0])
    [choice] = lenience_choice({"task": "code", "setups": setups}, zeros, tolerance=0.0)
    assert choice["chosen"] == "sd:2:exp=0.5" and choice["quality"] == (0.0, 0.0)
    # text: the target's log-likelihood per row; an empty answer's None is left out, not paired
    text = [{"setup": "sd:2", "key": "a", "sample": 0, "log_likelihood": -1.0},
            {"setup": "sd:2", "key": "b", "sample": 0, "log_likelihood": None},
            {"setup": "sd:2:exp=0.5", "key": "a", "sample": 0, "log_likelihood": -0.5},
            {"setup": "sd:2:exp=0.5", "key": "b", "sample": 0, "log_likelihood": -9.0}]
    [choice] = lenience_choice({"task": "text", "setups": setups}, text, tolerance=5.0)
    assert choice["metric"] == "log-lik/token" and choice["quality"] == (-4.75, -1.0)
    assert choice["paired"] == {"rows": 1, "items": 1, "mean": 0.5, "low": None, "high": None}
    # a lossless setup without a speed cannot be beaten or divided by
    slow = [_entry("sd:2", "draft", tps=None), setups[1]]
    [choice] = lenience_choice({"task": "code", "setups": slow}, zeros, tolerance=0.0)
    assert choice["chosen"] is None and "no quality or speed" in choice["why"]


def test_render_eval_renders_an_older_report_again(tmp_path):
    """benchmarks/render_eval.py on an eval.json of before draft_role (the role under "draft")."""
    import subprocess
    import sys

    setups = [_entry("target", None), _entry("sd:3", "draft"),
              _entry("sd:3:exp=0.5", "draft", 0.5, "exp")]
    for entry in setups:
        entry["draft"] = entry.pop("draft_role")
        entry["agreement"] = {"exact_match": None, "mean_first_difference": None}
        entry["acceptance_rate"] = entry["analytic_alpha"] = None
        entry["tokens_per_s"] = 2.0 if entry["setup"] == "sd:3:exp=0.5" else 1.0
    report = {"task": "code", "data": "d", "config": {"target": "t"}, "items": 1,
              "samples_per_item": 1, "temperature": 1.0, "device": "cpu", "dtype": "float32",
              "reference": "r", "sandbox": None, "setups": setups, "draft": "d"}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    samples = _sample_lines("sd:3", [1, 0]) + _sample_lines("sd:3:exp=0.5", [1, 1])
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in samples))
    script = Path(__file__).parents[1] / "benchmarks" / "render_eval.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True)
    rendered = (tmp_path / "eval.md").read_text()
    assert "| draft | sd:3 | exp | 1: 1.20×" in rendered
    # a run from before the lenience choice gets it from its samples.jsonl (eval.md only)
    assert "| draft | sd:3 | sd:3:exp=0.5 (of 1) | 2.00× |" in rendered
    assert "lenience_choice" not in json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "quality_speed.png").exists()


def test_a_compare_draft_runs_every_draft_setup_beside_the_draft(model_folder, tmp_path):
    """--compare-draft: each sd setup runs again right after itself with the second draft. The
    target as its own draft (fp32) accepts every token, the 1-layer draft does not, so the two
    entries really come from two drafts; both stay lossless."""
    from distillspec.tools.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("w1 w2 w3", "w7 w9")))
    out = tmp_path / "out"
    assert main(["eval", "--task", "text", "--target", str(model_folder), "--draft",
                 "target-layers:1", "--compare-draft", str(model_folder), "--data", str(prompts),
                 "--setups", "target,sd:2", "--max-new-tokens", "8", "--dtype", "float32",
                 "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [(e["setup"], e["draft_role"]) for e in report["setups"]] == [
        ("target", None), ("sd:2", "draft"), ("sd:2 [compare]", "compare")]
    _, draft, compare = report["setups"]
    assert compare["acceptance_rate"] == 1.0 > draft["acceptance_rate"]
    assert draft["agreement"]["exact_match"] == compare["agreement"]["exact_match"] == 1.0
    assert report["compare_draft"] == str(model_folder)
    assert "([compare]: " in (out / "eval.md").read_text()


def test_eval_refuses_before_writing(model_folder, tmp_path, capsys):
    from distillspec.tools.cli import main

    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "a", "prompt": "x"}) + "\n")
    assert main(["eval", "--target", str(model_folder), "--draft", "target-layers:1",
                 "--data", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:1" in capsys.readouterr().err and not out.exists()
    assert main(["eval", "--target", str(model_folder), "--setups", "sd:2:lin=0.5",
                 "--out", str(out)]) == 2
    assert "lenience changes nothing" in capsys.readouterr().err and not out.exists()


def test_quality_module_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys\nimport distillspec.decoding.quality, distillspec.tools.sandbox, "
            "distillspec.tools.eval_config\nprint('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**os.environ})
    assert result.stdout.strip() == "False"


def test_compare_setups_sit_beside_their_own_and_alternate_first():
    from distillspec.common.config import from_dict

    config = from_dict(EvalConfig, {"setups": ["target", "sd:2", "tree:4:1", "sd:3"],
                                    "compare_draft": "target-layers:1"})
    assert [(s.label, s.compare) for s in config.parsed_setups()] == [
        ("target", False), ("sd:2", False), ("sd:2 [compare]", True),
        ("tree:4:1 [compare]", True), ("tree:4:1", False), ("sd:3", False),
        ("sd:3 [compare]", True)]

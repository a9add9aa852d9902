"""``distillspec bench-serve`` end to end on tiny models: servers on loopback, the openai client."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny, start_tiny_server, tiny_tokenizer

from distillspec.common.config import from_dict
from distillspec.tools.bench_serve import run_bench_serve
from distillspec.tools.configs import BenchServeConfig

pytest.importorskip("openai")


def test_bench_serve_measures_each_sd_policy_and_reports_the_steps_by_mode(tmp_path, capsys):
    save_tiny(tmp_path / "target", layers=3, lm_scale=10.0, tokenizer=tiny_tokenizer())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 3} w{i + 7}"}) + "\n"
                               for i in range(6)))
    config = from_dict(BenchServeConfig, dict(
        target=str(tmp_path / "target"), draft="target-layers:1", prompts=str(prompts),
        num_requests=4, concurrency=[1, 4], max_tokens=10, sd_policy=["auto", "always"], rounds=2,
        out=str(tmp_path / "bench"), speculation={"gamma": 3},
        runtime={"device": "cpu", "dtype": "float32"}))
    report = run_bench_serve(config)
    said = capsys.readouterr().err
    # Progress: every level counted; from a concurrency's second round on, its time left.
    assert "level 12/12" in said and "level 4/12 (" in said
    assert "s left at 1 clients, 1 more concurrency not yet timed)" in said
    assert "s left at 4 clients)" in said
    assert list(report["modes"]) == ["target alone", "speculative", "speculative, sd-policy always"]
    alone, auto, always = report["modes"].values()
    # All three servers took turns, level by level, in alternating order.
    names = list(report["modes"])
    assert report["order"] == [[c, r, n] for c in (1, 4) for r in (0, 1)
                               for n in (names if r == 0 else names[::-1])]
    assert [r["concurrency"] for r in auto["rows"]] == [1, 4]
    assert all(r["rounds"] == 2 and len(r["output_tokens_per_s_rounds"]) == 2
               for mode in report["modes"].values() for r in mode["rows"])
    assert [(r["mode"], r["concurrency"]) for r in report["ratios"]] == [
        ("speculative", 1), ("speculative", 4), ("speculative, sd-policy always", 1),
        ("speculative, sd-policy always", 4)]
    for ratio, row in zip(report["ratios"][:2], auto["rows"]):
        base = alone["rows"][[1, 4].index(ratio["concurrency"])]
        assert ratio["of_medians"] == pytest.approx(
            row["output_tokens_per_s"] / base["output_tokens_per_s"])
        assert ratio["per_round"] == pytest.approx(
            [a / b for a, b in zip(row["output_tokens_per_s_rounds"],
                                   base["output_tokens_per_s_rounds"])])
    assert all(set(r["steps_by_mode"]) == {"plain"} for r in alone["rows"])
    assert all(set(r["steps_by_mode"]) == {"speculate"} for r in always["rows"])
    # auto measured its three modes (at batch 1 the warm-up's 2 requests and the first level's
    # 4 are well past its 2 measured steps per mode); always ran one.
    assert set(auto["steps_by_mode"]) == {"speculate", "gamma1", "plain"}
    assert set(always["steps_by_mode"]) == {"speculate"}
    assert sum(auto["steps_by_mode"].values()) >= sum(sum(r["steps_by_mode"].values())
                                                     for r in auto["rows"])
    assert auto["sd_policy"] == "auto" and always["sd_policy"] == "always"
    assert auto["sd_margin"] == 0.1 and always["sd_margin"] is None
    written = json.loads((tmp_path / "bench" / "bench-serve.json").read_text())
    assert written["modes"].keys() == report["modes"].keys()
    assert "--sd-policy auto,always" in written["command"]  # the command that made it
    assert "engine steps by mode" in (tmp_path / "bench" / "bench-serve.md").read_text()


def test_bench_serve_drives_a_running_server_at_a_url_in_rounds(tmp_path):
    local, url = start_tiny_server(tmp_path)
    try:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 2}"}) + "\n"
                                   for i in range(4)))
        config = from_dict(BenchServeConfig, dict(
            target=str(tmp_path / "target"), url=url, prompts=str(prompts), num_requests=3,
            concurrency=[1, 3], max_tokens=6, rounds=2, out=str(tmp_path / "bench")))
        report = run_bench_serve(config)
    finally:
        local.__exit__(None, None, None)
    assert list(report["modes"]) == ["url"] and report["ratios"] == []
    assert report["order"] == [[1, 0, "url"], [1, 1, "url"], [3, 0, "url"], [3, 1, "url"]]
    rows = report["modes"]["url"]["rows"]
    assert [(r["concurrency"], r["rounds"]) for r in rows] == [(1, 2), (3, 2)]
    assert all(r["output_tokens_per_s"] > 0 for r in rows)


def test_a_level_over_rounds_is_the_median_of_each_figure_and_the_sum_of_steps():
    from distillspec.tools.bench_serve import median_row

    levels = [{"concurrency": 4, "requests": 32, "output_tokens_per_s": tok, "ttft_p50_s": ttft,
               "steps_by_mode": {"plain": plain, "gamma1": 2}}
              for tok, ttft, plain in ((10.0, 0.3, 5), (30.0, 0.1, 7), (20.0, 0.2, 1))]
    row = median_row(levels)
    assert row["output_tokens_per_s"] == 20.0 and row["ttft_p50_s"] == 0.2
    assert row["output_tokens_per_s_rounds"] == [10.0, 30.0, 20.0]
    assert row["steps_by_mode"] == {"plain": 13, "gamma1": 6}
    assert row["concurrency"] == 4 and row["rounds"] == 3 and row["requests"] == 32


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        from_dict(BenchServeConfig, dict(rounds=0))


def test_sd_policy_with_url_is_refused():
    with pytest.raises(ValueError, match="drop --url"):
        from_dict(BenchServeConfig, dict(url="http://127.0.0.1:1/v1", sd_policy=["always"]))


def test_one_auto_server_per_margin_and_bad_margins_refused():
    from distillspec.tools.bench_serve import _sd_modes
    from distillspec.tools.configs import ServeConfig

    config = from_dict(BenchServeConfig, dict(sd_policy=["auto", "always"], sd_margin=[0.1, 0]))
    modes = _sd_modes(ServeConfig(), config)
    assert list(modes) == ["speculative", "speculative, sd-policy auto, margin 0",
                           "speculative, sd-policy always"]
    assert [(m.sd_policy, m.sd_margin) for m in modes.values()] == [
        ("auto", 0.1), ("auto", 0.0), ("always", 0.1)]
    for margins in ([-0.1], [0.1, 0.1], []):
        with pytest.raises(ValueError, match="sd_margin"):
            from_dict(BenchServeConfig, dict(sd_margin=margins))
    with pytest.raises(ValueError, match="drop --url"):
        from_dict(BenchServeConfig, dict(url="http://127.0.0.1:1/v1", sd_margin=[0.0]))
    with pytest.raises(ValueError, match="sd_margin"):
        from_dict(ServeConfig, dict(sd_margin=11.0))
    with pytest.raises(ValueError, match="sd_margin 0.2 would be ignored"):
        from_dict(ServeConfig, dict(sd_policy="always", sd_margin=0.2))


def test_the_markdown_names_the_sd_setting_a_tree_included():
    from distillspec.tools.bench_serve import markdown

    def report(speculation):
        return {"modes": {"speculative": {"rows": [], "speculation": speculation}}}

    tree = {"gamma": 2, "confidence_threshold": 0.0, "tree": "3:1"}
    assert "SD setting: tree 3:1." in markdown(report(tree))
    chain = {"gamma": 2, "confidence_threshold": 0.4, "tree": ""}
    assert "SD setting: gamma 2, confidence threshold 0.4." in markdown(report(chain))


def test_the_order_keeps_alternating_from_level_to_level_with_one_round():
    from distillspec.tools.bench_serve import _alternate

    class Recorder:  # stands in for a server: only the order of the levels is under test
        def __init__(self, name, seen):
            self.name, self.seen = name, seen

        def level(self, concurrency, round_index):
            self.seen.append((concurrency, self.name))

    seen, order = [], []
    servers = {name: Recorder(name, seen) for name in ("A", "B")}
    _alternate(servers, from_dict(BenchServeConfig, dict(concurrency=[1, 4, 16], rounds=1)), order)
    assert seen == [(1, "A"), (1, "B"), (4, "B"), (4, "A"), (16, "A"), (16, "B")]
    assert [entry[2] for entry in order] == ["A", "B", "B", "A", "A", "B"]


def test_a_repeated_concurrency_is_refused_and_a_silent_baseline_gives_no_ratio():
    from distillspec.tools.bench_serve import markdown, ratios

    with pytest.raises(ValueError, match="lists a value twice"):
        from_dict(BenchServeConfig, dict(concurrency=[1, 4, 1]))
    row = {"concurrency": 1, "output_tokens_per_s": 5.0, "output_tokens_per_s_rounds": [5.0, 5.0],
           **dict.fromkeys(("requests_per_s", "ttft_p50_s", "ttft_p99_s", "per_token_p50_s",
                            "per_token_p99_s"), 0.1)}
    silent = {**row, "output_tokens_per_s": 0.0, "output_tokens_per_s_rounds": [0.0, 2.0]}
    report = {"modes": {"target alone": {"rows": [silent]}, "speculative": {"rows": [row]}}}
    report["ratios"] = ratios(report)
    assert report["ratios"][0]["of_medians"] is None
    assert report["ratios"][0]["per_round"] == [None, 2.5]
    assert "| speculative | 1 | **–×** | –, 2.50 | –× |" in markdown(report)


def test_open_loop_arrivals_are_a_seeded_poisson_process():
    from distillspec.tools.bench_serve import arrival_times

    assert arrival_times(5, 0.0, 0) == [0.0] * 5  # closed loop: every client starts at once
    times = arrival_times(4000, 20.0, 3)
    assert times == arrival_times(4000, 20.0, 3) and times != arrival_times(4000, 20.0, 4)
    gaps = [later - earlier for earlier, later in zip([0.0] + times, times)]
    assert min(gaps) > 0
    # Exponential gaps of mean 1/20 s: the mean within 5 % (its standard error is 1.6 %), and
    # the share of gaps above the mean near e^-1 (0.368), which a fixed gap (0 or 1) would miss.
    assert sum(gaps) / len(gaps) == pytest.approx(0.05, rel=0.05)
    assert sum(gap > 0.05 for gap in gaps) / len(gaps) == pytest.approx(0.368, abs=0.03)


def test_open_loop_latency_counts_the_queue_and_temperature_reaches_the_server(tmp_path):
    from openai import OpenAI

    from distillspec.tools.bench_serve import drive, one_request

    local, url = start_tiny_server(tmp_path, lm_scale=0.5)  # near-uniform: samples differ
    try:
        tokenizer = tiny_tokenizer()
        prompts = [{"prompt": "w1 w2 w3"}]
        # Closed loop, one client: four requests one after another, each timed from its
        # sending, so even the longest is a fraction of the whole run.
        served = drive(url, "tiny", prompts, 1, 4, 8, tokenizer)
        assert served["latency_p99_s"] < 0.9 * served["wall_s"]
        # Open loop, four requests arriving within a few ms, one in flight: the last one waits
        # for the other three, and its latency from arrival spans nearly the whole run.
        queued = drive(url, "tiny", prompts, 1, 4, 8, tokenizer, request_rate=1000.0)
        assert queued["latency_p99_s"] > queued["wall_s"] - 0.05
        assert queued["ttft_p50_s"] < queued["latency_p50_s"]
        client = OpenAI(base_url=url, api_key="none", max_retries=0)
        greedy = {one_request(client, "tiny", prompts[0], 8)["text"] for _ in range(3)}
        sampled = {one_request(client, "tiny", prompts[0], 8, temperature=1.0)["text"]
                   for _ in range(4)}
    finally:
        local.__exit__(None, None, None)
    assert len(greedy) == 1 and len(sampled) > 1


def test_bench_serve_open_loop_at_a_temperature_reports_latency_from_arrival(tmp_path):
    local, url = start_tiny_server(tmp_path)
    try:
        config = from_dict(BenchServeConfig, dict(
            target=str(tmp_path / "target"), url=url, prompts="builtin:chat:heldout",
            num_requests=3, concurrency=[2], max_tokens=4, rounds=1, request_rate=50.0,
            temperature=0.7, seed=5, out=str(tmp_path / "bench")))
        report = run_bench_serve(config)
    finally:
        local.__exit__(None, None, None)
    row = report["modes"]["url"]["rows"][0]
    assert row["latency_p50_s"] >= row["ttft_p50_s"] > 0
    assert report["config"]["request_rate"] == 50.0 and report["config"]["temperature"] == 0.7
    written = (tmp_path / "bench" / "bench-serve.md").read_text()
    assert "Open loop: Poisson arrivals at 50 requests/s" in written and "Temperature 0.7" in written
    assert "--request-rate 50.0" in report["command"]


@pytest.mark.parametrize("values, message", [
    (dict(request_rate=-1.0), "request_rate must be >= 0"),
    (dict(temperature=2.5), "temperature must be <= 2"),
    (dict(seed=-1, request_rate=1.0), "seed must be >= 0"),
    (dict(seed=3), "seed 3 would be ignored"),
    (dict(sd_policy=["always"], sd_margin=[0.2]), "sd_margin \\[0.2\\] would be ignored"),
])
def test_bad_open_loop_knobs_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        from_dict(BenchServeConfig, values)

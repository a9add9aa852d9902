"""``distillspec bench-serve``: drive the server with concurrent streaming clients.

For each mode (the target alone, then SD once per ``--sd-policy``; or the one server at
``--url``) and each concurrency C, ``--num-requests`` requests (``--temperature``, greedy by
default) are sent by C client threads through the official ``openai`` client, streaming, so each
request's time to first token and per-output-token time are measured where a user sees them.
In a closed loop (the default) each client sends its next request when its last ends; with
``--request-rate`` R requests arrive on a seeded Poisson schedule instead (open loop, as
vLLM's benchmark_serving offers them), at most C in flight, and each request's latency counts
from its arrival. Why both: closed-loop clients that start together stay in step with a plain
server (their requests end together and are admitted together) but not with a speculating one,
whose rows accept different numbers of tokens; real traffic arrives out of step for both.
Each server is a ``distillspec serve`` process of its own (``ServerProcess``), as deployed:
clients in the server's process would compete with its engine thread for the GIL, and an SD
step, with its many small draft operations, pays for that more than a plain step (measured on 2 cores: SD 0.64x the target
alone at one client in-process, 0.75x with the servers as processes;
docs/results/bench-serve-policy). All servers start first and stay up; each level
(concurrency) then runs ``--rounds`` times per server, the servers taking turns in alternating
order (A B, B A, ...), so the machine's drift falls on every mode alike (run one after the
other, a level of the target alone moved 22 % between two runs of the same command on a 2-core
VM, more than the SD gain measured at 4 clients). Reported per (mode, C), each the median over
rounds: requests/s, output tokens/s, TTFT, per-token latency and request latency p50 and p99;
per SD mode and C, SD ÷ the target alone of the medians and round by round, and the target
alone's median latency ÷ SD's; the server's acceptance counters.
JSON, Markdown and a PNG.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from distillspec.common.config import changed_args, changed_flags, replace, to_dict
from distillspec.common.io import atomic_write_json, atomic_write_text
from distillspec.common.rundir import claim
from distillspec.common.runtime import release_openmp_threads
from distillspec.tools.configs import BenchServeConfig, ServeConfig


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(client, model: str, prompt: dict, max_tokens: int,
                temperature: float = 0.0) -> dict:
    """One streamed request: its time to first token, its latency and its text (times from
    the moment it was sent)."""
    start = time.perf_counter()
    first, pieces = None, 0
    kwargs = dict(model=model, max_tokens=max_tokens, temperature=temperature, stream=True)
    if "messages" in prompt:
        stream = client.chat.completions.create(messages=prompt["messages"], **kwargs)
        text_of = lambda c: c.choices[0].delta.content if c.choices else None  # noqa: E731
    else:
        stream = client.completions.create(prompt=prompt["prompt"], **kwargs)
        text_of = lambda c: c.choices[0].text if c.choices else None  # noqa: E731
    text = ""
    for chunk in stream:
        piece = text_of(chunk)
        if piece:
            first = first or time.perf_counter()
            pieces += 1
            text += piece
    end = time.perf_counter()
    return {"sent": start, "ttft": (first or end) - start, "latency": end - start, "text": text}


def arrival_times(count: int, request_rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each of ``count`` requests arrives: all at 0 for a closed
    loop (``request_rate`` 0), else a Poisson process of ``request_rate`` per second (gaps drawn
    from Exp(request_rate), seeded, so every server is offered the same schedule)."""
    if request_rate <= 0:
        return [0.0] * count
    rng, now, times = random.Random(seed), 0.0, []
    for _ in range(count):
        now += rng.expovariate(request_rate)
        times.append(now)
    return times


def drive(url: str, model: str, prompts: list[dict], concurrency: int, count: int,
          max_tokens: int, tokenizer, *, temperature: float = 0.0, request_rate: float = 0.0,
          seed: int = 0) -> dict[str, Any]:
    """``count`` requests through ``concurrency`` client threads. Closed loop (``request_rate``
    0): each thread sends its next request when its last ends. Open loop: requests arrive on a
    seeded Poisson schedule whatever the server's pace, at most ``concurrency`` in flight, the
    rest queued at the client; ``latency`` counts from arrival (the queue included), TTFT and
    per-token times from sending."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    jobs = [prompts[i % len(prompts)] for i in range(count)]
    offsets = arrival_times(count, request_rate, seed)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = []
        for prompt, offset in zip(jobs, offsets):
            time.sleep(max(0.0, start + offset - time.perf_counter()))
            futures.append(pool.submit(one_request, client, model, prompt, max_tokens,
                                       temperature))
        results = [future.result() for future in futures]
    wall = time.perf_counter() - start
    tokens = [len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in results]
    per_token = [(r["latency"] - r["ttft"]) / (n - 1) for r, n in zip(results, tokens) if n > 1]
    ttft = [r["ttft"] for r in results]
    # A closed loop's client sends when its last request ends: arrival and sending are one.
    latency = [r["latency"] if request_rate <= 0 else r["sent"] + r["latency"] - (start + offset)
               for r, offset in zip(results, offsets)]
    return {
        "concurrency": concurrency, "requests": count, "wall_s": wall,
        "requests_per_s": count / wall, "output_tokens_per_s": sum(tokens) / wall,
        "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
        "per_token_p50_s": _percentile(per_token, 0.5),
        "per_token_p99_s": _percentile(per_token, 0.99),
        "latency_p50_s": _percentile(latency, 0.5), "latency_p99_s": _percentile(latency, 0.99),
        "mean_ttft_s": statistics.mean(ttft),
    }


def _acceptance(metrics_text: str) -> dict[str, float]:
    values = {}
    for line in metrics_text.splitlines():
        for name in ("num_draft_tokens_total", "num_accepted_tokens_total", "num_emitted_tokens_total"):
            if line.startswith(f"distillspec_spec_decode_{name}"):
                values[name] = float(line.split()[-1])
    drafted = values.get("num_draft_tokens_total", 0.0)
    return {**values, "acceptance_rate": values.get("num_accepted_tokens_total", 0.0) / drafted
            if drafted else None}


def _steps_by_mode(metrics_text: str) -> dict[str, int]:
    """``distillspec_spec_decode_steps_total{mode=...}``: the engine steps so far, per mode."""
    steps = {}
    for line in metrics_text.splitlines():
        if line.startswith('distillspec_spec_decode_steps_total{mode="'):
            mode = line.split('"')[1]
            steps[mode] = int(float(line.split()[-1]))
    return steps


def _served_model(url: str, fallback: str) -> str:
    """The first model id the server at ``url`` lists (``GET /v1/models``), else ``fallback``."""
    from openai import OpenAI

    models = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60).models.list().data
    return models[0].id if models else fallback


def _metrics(url: str) -> str:
    import urllib.request

    return urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()


def _speculation(metrics_text: str) -> dict | None:
    """The setting the server runs, from ``distillspec_speculation_info`` (None: no draft)."""
    for line in metrics_text.splitlines():
        if line.startswith("distillspec_speculation_info{"):
            labels = dict(part.split("=", 1) for part in
                          line[line.index("{") + 1: line.rindex("}")].split('",'))
            labels = {k.strip(): v.strip().strip('"') for k, v in labels.items()}
            if labels.get("draft") == "none":
                return None
            return {"gamma": int(labels["gamma"]),
                    "confidence_threshold": float(labels["confidence_threshold"]),
                    "tree": labels["tree"], "lookup": int(labels.get("lookup", 0)),
                    "draft": labels["draft"],
                    "draft_weights": labels.get("draft_weights", "none")}
    return None


class ServerProcess:
    """``distillspec serve --port 0`` as a process of its own (``config`` as its flags), its
    URL once it listens; stopped with SIGTERM (then killed) on exit."""

    def __init__(self, config: ServeConfig, start_seconds: float = 300.0):
        flags = changed_args(replace(config, port=0, drain_seconds=1.0))
        self.command = [sys.executable, "-m", "distillspec", "serve", *flags]
        self.start_seconds = start_seconds
        self.said: list[str] = []

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + self.start_seconds
        while time.time() < deadline:
            line = self.process.stderr.readline()
            self.said.append(line)
            if "listening on " in line:
                threading.Thread(target=self._drain, daemon=True).start()
                return line.split("listening on ")[1].strip()
            if not line and self.process.poll() is not None:
                break
        self.__exit__()
        raise RuntimeError("the server did not start:\n" + "".join(self.said[-30:]))

    def _drain(self) -> None:
        for line in self.process.stderr:  # keep its pipe from filling; kept for errors
            self.said.append(line)

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _sd_modes(serve: ServeConfig, config: BenchServeConfig) -> dict[str, ServeConfig]:
    """One SD server per --sd-policy, and per --sd-margin for auto; the first is named
    "speculative", each other by what sets it apart."""
    variants = [(policy, margin) for policy in config.sd_policy
                for margin in (config.sd_margin if policy == "auto" else [None])]
    modes = {}
    for index, (policy, margin) in enumerate(variants):
        if index == 0:
            name = "speculative"
        elif margin is None or len(config.sd_margin) == 1:
            name = f"speculative, sd-policy {policy}"
        else:
            name = f"speculative, sd-policy {policy}, margin {margin:g}"
        modes[name] = replace(serve, sd_policy=policy,
                              sd_margin=serve.sd_margin if margin is None else margin)
    return modes


class LocalServer:
    """A ``distillspec serve`` app on a free loopback port, in a background thread."""

    def __init__(self, config: ServeConfig):
        import uvicorn

        from distillspec.tools.serve import build_app, load_server

        self.server = load_server(config)
        self.uvicorn = uvicorn.Server(uvicorn.Config(build_app(self.server), host="127.0.0.1",
                                                     port=config.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)

    def __enter__(self) -> str:
        # The engine thread starts in uvicorn's; the team to free is this thread's, which
        # loaded the models (EngineWorker.start frees only its caller's).
        release_openmp_threads()
        self.thread.start()
        deadline = time.time() + 120
        while not self.uvicorn.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


def _prompts(config: BenchServeConfig, tokenizer) -> list[dict]:
    from distillspec.common.io import read_jsonl
    from distillspec.training.builtin_data import builtin_dataset_items

    if config.prompts.startswith("builtin:"):
        records = [item.record for item in builtin_dataset_items(config.prompts) if item.record]
    else:
        records = [record for _, record in read_jsonl(config.prompts)]
    prompts = [r for r in records if "messages" in r or isinstance(r.get("prompt"), str)]
    if not prompts:
        raise ValueError(f"{config.prompts} has no prompt or messages records.")
    return [{"messages": r["messages"]} if "messages" in r else {"prompt": r["prompt"]}
            for r in prompts]


def run_bench_serve(config: BenchServeConfig) -> dict[str, Any]:
    from distillspec.models.loading import load_model

    out = claim(config.out, "bench-serve")
    out.track("bench-serve.json", "bench-serve.md", "bench-serve.png")
    draft = config.draft
    if draft == "auto" and not config.url:  # the demo's draft, measured here whatever its speed
        from distillspec.models.registry import distilled_draft_for

        found = distilled_draft_for(config.target)
        if found is None:
            raise ValueError(f"bench-serve compares serving with and without a draft, and no "
                             f"distilled draft is recorded for {config.target}: pass --draft "
                             "PATH (or run `distillspec demo` first).")
        draft = str(found)
    serve = ServeConfig(target=config.target, draft=draft, port=0,
                        max_batch=max(config.concurrency), speculation=config.speculation,
                        measured_setting=config.measured_setting, runtime=config.runtime)
    _, tokenizer = load_model(config.target, device="cpu")
    prompts = _prompts(config, tokenizer)
    modes: dict = {"url": config.url} if config.url else {"target alone": replace(
        serve, draft="none", runtime=replace(serve.runtime, draft_quantize="none"))}
    if not config.url:  # one SD server per --sd-policy (auto: per --sd-margin); the first is
        modes.update(_sd_modes(serve, config))  # "speculative"
    report = {"command": ("distillspec bench-serve " + changed_flags(config)).strip(),
              "config": to_dict(config), "modes": {}, "order": []}
    with ExitStack() as stack:
        servers = {name: _Server(name, mode, config, prompts, tokenizer, stack)
                   for name, mode in modes.items()}
        _alternate(servers, config, report["order"])
        report["modes"] = {name: server.summary() for name, server in servers.items()}
    report["ratios"] = ratios(report)
    atomic_write_json(out.child("bench-serve.json"), report)
    atomic_write_text(out.child("bench-serve.md"), markdown(report))
    plot(report, out.child("bench-serve.png"))
    print(markdown(report))
    return report


def _alternate(servers: dict, config: BenchServeConfig, order: list) -> None:
    """Every level (concurrency) ``config.rounds`` times per server, the servers taking turns in
    alternating order (A B, B A, A B, ...; the order keeps alternating from one level to the
    next, so with one round too no server always goes first), so a drift of the machine during
    the run falls on every mode alike and a ratio compares levels measured minutes apart at
    most."""
    names, levels = list(servers), len(config.concurrency) * config.rounds * len(servers)
    start, turn, seconds = time.perf_counter(), 0, {}
    for index, concurrency in enumerate(config.concurrency):
        for round_index in range(config.rounds):
            turn += 1
            for name in names if turn % 2 == 1 else names[::-1]:
                order.append([concurrency, round_index, name])
                print(f"bench-serve: level {len(order)}/{levels} ({time.perf_counter() - start:.0f}"
                      f" s so far{_left(seconds, concurrency, config, round_index, index)}): "
                      f"{name}, concurrency {concurrency}, round {round_index + 1}/"
                      f"{config.rounds} ...", file=sys.stderr, flush=True)
                level_start = time.perf_counter()
                servers[name].level(concurrency, round_index)
                seconds.setdefault(concurrency, {})[name] = time.perf_counter() - level_start


def _left(seconds: dict, concurrency: int, config: BenchServeConfig, round_index: int,
          index: int) -> str:
    """``, ~N s left at this concurrency`` once its first round is timed (each server's last
    time there, for the rounds still to run), and how many concurrencies are untimed."""
    timed = seconds.get(concurrency)
    if not timed or round_index == 0:
        return ""
    later = len(config.concurrency) - index - 1
    left = sum(timed.values()) * (config.rounds - round_index)
    return (f", ~{left:.0f} s left at {concurrency} clients"
            + (f", {later} more concurrenc{'y' if later == 1 else 'ies'} not yet timed"
               if later else ""))


class _Server:
    """One mode under test: a ``distillspec serve`` process on loopback started from its
    ``ServeConfig`` (warmed up, its setting read from /metrics), or the running server at a URL;
    it keeps every timed level, and the engine steps by mode each one ran."""

    def __init__(self, name: str, mode: ServeConfig | str, config: BenchServeConfig, prompts,
                 tokenizer, stack: ExitStack):
        self.name, self.config, self.prompts, self.tokenizer = name, config, prompts, tokenizer
        self.levels: dict[int, list[dict]] = {}
        self.ours, self.metrics = not isinstance(mode, str), ""
        if not self.ours:  # requests name the model it serves (its --model-name may differ)
            self.url, self.model, self.policy = mode, _served_model(mode, config.target), None
            return
        self.url = stack.enter_context(ServerProcess(mode))
        self.model, self.policy = mode.model_name or mode.target, mode.sd_policy
        self.margin = mode.sd_margin if mode.sd_policy == "auto" else None
        drive(self.url, self.model, prompts, 1, 2, config.max_tokens, tokenizer,
              temperature=config.temperature)  # warm-up
        self.metrics = _metrics(self.url)
        self.speculation = _speculation(self.metrics)  # what it really runs (may be the draft's)
        if name.startswith("speculative") and self.speculation is None:
            raise ValueError(f"the speculative server loaded no draft from {mode.draft!r}.")
        self.steps = _steps_by_mode(self.metrics)

    def level(self, concurrency: int, round_index: int) -> None:
        """One timed level; in an open loop round r of every server is offered one schedule
        (seed + r)."""
        config = self.config
        row = drive(self.url, self.model, self.prompts, concurrency, config.num_requests,
                    config.max_tokens, self.tokenizer, temperature=config.temperature,
                    request_rate=config.request_rate, seed=config.seed + round_index)
        if self.ours:
            self.metrics = _metrics(self.url)
            after = _steps_by_mode(self.metrics)  # the engine steps of this level, by mode
            row["steps_by_mode"] = {m: n - self.steps.get(m, 0) for m, n in after.items()
                                    if n > self.steps.get(m, 0)}
            self.steps = after
        self.levels.setdefault(concurrency, []).append(row)

    def summary(self) -> dict:
        rows = [median_row(levels) for levels in self.levels.values()]
        if not self.ours:
            return {"rows": rows}
        # The whole run's steps by mode, warm-up included (where a policy measures its modes first).
        return {"rows": rows, "server": _acceptance(self.metrics), "speculation": self.speculation,
                "sd_policy": self.policy, "sd_margin": self.margin, "steps_by_mode": self.steps}


def median_row(levels: list[dict]) -> dict:
    """One level's rounds as one row: each figure the median over the rounds (each round's
    throughput kept in ``output_tokens_per_s_rounds``), the engine steps by mode summed."""
    row = {key: statistics.median(level[key] for level in levels)
           for key, value in levels[0].items() if isinstance(value, float)}
    row.update(concurrency=levels[0]["concurrency"], requests=levels[0]["requests"],
               rounds=len(levels))
    row["output_tokens_per_s_rounds"] = [level["output_tokens_per_s"] for level in levels]
    steps: dict[str, int] = {}
    for level in levels:
        for mode, count in level.get("steps_by_mode", {}).items():
            steps[mode] = steps.get(mode, 0) + count
    if steps:
        row["steps_by_mode"] = steps
    return row


def ratios(report: dict) -> list[dict]:
    """Per SD mode and concurrency: its output tokens/s ÷ the target alone's, of the medians and
    round by round (round r of one over round r of the other, measured back to back), and the
    target alone's median latency ÷ SD's; None where a divisor is 0."""
    alone = report["modes"].get("target alone")
    if alone is None:
        return []
    baseline = {row["concurrency"]: row for row in alone["rows"]}
    found = []
    for name, mode in report["modes"].items():
        for row in mode["rows"] if name != "target alone" else []:
            base = baseline[row["concurrency"]]
            found.append({
                "mode": name, "concurrency": row["concurrency"],
                "of_medians": _ratio(row["output_tokens_per_s"], base["output_tokens_per_s"]),
                "per_round": [_ratio(sd, ref) for sd, ref in zip(
                    row["output_tokens_per_s_rounds"], base["output_tokens_per_s_rounds"])],
                # > 1: SD's requests end sooner (in an open loop below saturation both serve the
                # offered rate, so latency is where SD shows).
                "latency_p50_speedup": _ratio(base.get("latency_p50_s", 0.0),
                                              row.get("latency_p50_s", 0.0)),
            })
    return found


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def markdown(report: dict) -> str:
    config = report.get("config", {})
    rate = config.get("request_rate", 0.0)
    lines = [(f"Open loop: Poisson arrivals at {rate:g} requests/s, at most C in flight; latency "
              "counts from arrival." if rate else "Closed loop: C clients, each sending its next "
              "request when its last ends.") + f" Temperature {config.get('temperature', 0.0):g}.",
             "", "| mode | concurrency | req/s | output tok/s | TTFT p50 | TTFT p99 | per-token p50 "
             "| per-token p99 | latency p50 | latency p99 | engine steps by mode |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, mode in report["modes"].items():
        for r in mode["rows"]:
            steps = ", ".join(f"{m} {n}" for m, n in sorted(r.get("steps_by_mode", {}).items()))
            lines.append(
                f"| {name} | {r['concurrency']} | {r['requests_per_s']:.2f} "
                f"| {r['output_tokens_per_s']:.1f} | {r['ttft_p50_s'] * 1000:.0f} ms "
                f"| {r['ttft_p99_s'] * 1000:.0f} ms | {r['per_token_p50_s'] * 1000:.1f} ms "
                f"| {r['per_token_p99_s'] * 1000:.1f} ms | {_seconds(r.get('latency_p50_s'))} "
                f"| {_seconds(r.get('latency_p99_s'))} | {steps or '-'} |")
    rounds = config.get("rounds", 1)
    if rounds > 1:
        lines += ["", f"Each figure is the median of {rounds} rounds; the servers took turns in "
                      "alternating order (A B, B A, ...), steps by mode are summed over rounds."]
    if report.get("ratios"):
        lines += ["", "| SD mode | concurrency | SD ÷ target alone, of the medians | round by round "
                      "| latency p50, target alone ÷ SD |", "|---|---|---|---|---|"]
        for ratio in report["ratios"]:
            each = ", ".join(_times(value) for value in ratio["per_round"])
            lines.append(f"| {ratio['mode']} | {ratio['concurrency']} "
                         f"| **{_times(ratio['of_medians'])}×** | {each} "
                         f"| {_times(ratio.get('latency_p50_speedup'))}× |")
    server = report["modes"].get("speculative", {}).get("server")
    if server and server.get("acceptance_rate") is not None:
        lines += ["", f"Server-side acceptance rate (SD): {server['acceptance_rate']:.3f}."]
    setting = report["modes"].get("speculative", {}).get("speculation")
    if setting:
        shape = (f"tree {setting['tree']}" if setting.get("tree")
                 else f"gamma {setting['gamma']}, confidence threshold "
                      f"{setting['confidence_threshold']:g}")
        if setting.get("lookup"):
            shape += f", prompt lookup {setting['lookup']}"
        lines += [f"SD setting: {shape}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from distillspec.tools.plots import _pyplot

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    # Open loop: a request's whole latency from arrival (queue included) is what a user waits.
    figure_of = "latency" if report.get("config", {}).get("request_rate") else "per_token"
    for name, mode in report["modes"].items():
        rows = mode["rows"]
        concurrency = [r["concurrency"] for r in rows]
        left.plot(concurrency, [r["output_tokens_per_s"] for r in rows], "o-", label=name)
        right.plot(concurrency, [r[f"{figure_of}_p50_s"] * 1000 for r in rows], "o-",
                   label=f"{name} p50")
        right.plot(concurrency, [r[f"{figure_of}_p99_s"] * 1000 for r in rows], "x--",
                   label=f"{name} p99")
    left.set_xlabel("concurrent clients" if figure_of == "per_token" else "most in flight")
    left.set_ylabel("output tokens/s")
    right.set_xlabel(left.get_xlabel())
    right.set_ylabel("per-output-token latency (ms)" if figure_of == "per_token"
                     else "request latency from arrival (ms)")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


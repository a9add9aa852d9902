"""One request must never stop the server: bad seeds, engine faults, a dead engine, the waiting
bound, shutdown, and a fuzz run drawn from the server's own OpenAPI request schema."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import save_tiny, tiny_tokenizer

from distillspec import autoregressive_generate
from distillspec.common.config import from_dict
from distillspec.decoding.engine import Decoder
from distillspec.decoding.requests import Request
from distillspec.models.loading import load_model
from distillspec.tools.bench_serve import LocalServer
from distillspec.tools.configs import BenchConfig, GenerateConfig, ServeConfig
from distillspec.training.config import DistillConfig

POISON = 77  # a prompt token id whose rows the injected fault fails ("w73")
TIMEOUT = 30  # seconds any single request may take here; a hang fails the test


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    save_tiny(root / "target", layers=3, lm_scale=10.0, tokenizer=tiny_tokenizer())
    return root / "target"


def start(folder, **overrides) -> tuple[LocalServer, str]:
    config = from_dict(ServeConfig, dict(
        target=str(folder), draft="target-layers:1", port=0, model_name="tiny",
        speculation={"gamma": 3}, runtime={"device": "cpu", "dtype": "float32"}, **overrides))
    local = LocalServer(config)
    return local, local.__enter__().removesuffix("/v1")


@pytest.fixture(scope="module")
def served(folder):
    local, url = start(folder, max_batch=8)
    yield local, url
    local.__exit__(None, None, None)


def post(url: str, body, path: str = "/v1/completions"):
    data = json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            text = response.read().decode()
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
                return response.status, {"events": events}, _lower(response.headers)
            return response.status, json.loads(text), _lower(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), _lower(error.headers)


def running(url: str) -> float:
    """The server's ``distillspec_num_requests_running`` gauge."""
    with urllib.request.urlopen(url + "/metrics", timeout=TIMEOUT) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("distillspec_num_requests_running "):
                return float(line.split()[-1])
    raise AssertionError("/metrics has no distillspec_num_requests_running")


def _lower(headers) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


def health(url: str):
    try:
        with urllib.request.urlopen(url + "/health", timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def good(url: str) -> None:
    """A normal request answers in normal time."""
    begin = time.perf_counter()
    status, body, _ = post(url, {"prompt": "w1 w2", "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert time.perf_counter() - begin < 5


def greedy_text(folder, prompt: str, max_tokens: int) -> str:
    target, tokenizer = load_model(folder, device="cpu", dtype="float32")
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    result = autoregressive_generate(target, ids, max_new_tokens=max_tokens,
                                     eos_token_id=target.generation_config.eos_token_id)
    return tokenizer.decode(result.sequences[0], skip_special_tokens=True)


# -- reproduction 1: a seed the RNG cannot take ----------------------------------------------------


@pytest.mark.parametrize("seed", [2**70, -(2**70), 2**64, -(2**63) - 1, 1.5, "7", True])
def test_a_seed_out_of_range_is_refused_and_the_server_keeps_serving(served, seed):
    _, url = served
    status, body, _ = post(url, {"prompt": "w1", "temperature": 1, "seed": seed, "max_tokens": 3})
    assert status == 400 and body["error"]["param"] == "seed"
    assert health(url)[0] == 200
    good(url)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_seeds_at_the_ends_of_the_range_are_honoured(served, seed):
    _, url = served
    answers = [post(url, {"prompt": "w1 w5", "temperature": 1, "seed": seed, "max_tokens": 6})
               for _ in range(2)]
    assert [a[0] for a in answers] == [200, 200]
    assert answers[0][1]["choices"][0]["text"] == answers[1][1]["choices"][0]["text"]


def test_the_python_api_and_the_cli_knobs_refuse_such_seeds(folder):
    target, _ = load_model(folder, device="cpu", dtype="float32")
    decoder = Decoder(target)
    with pytest.raises(ValueError, match="seed"):
        decoder.add(Request([1, 5], 3, seed=2**70))
    assert not decoder.has_work
    for config in (GenerateConfig, BenchConfig, DistillConfig):
        with pytest.raises(ValueError, match=r"2\*\*63"):
            config(seed=-(2**70))


# -- supervision: a fault fails its own request only -----------------------------------------------


@pytest.fixture
def poisoned(monkeypatch):
    """Every step that holds a row whose prompt contains POISON raises."""
    step = Decoder.step

    def faulty(self):
        time.sleep(0.02)  # slow enough that concurrent requests share steps
        if any(POISON in row.request.prompt_ids for row in self.rows + self.queue):
            raise RuntimeError("injected fault")
        return step(self)

    monkeypatch.setattr(Decoder, "step", faulty)


def test_an_injected_step_fault_fails_only_its_row(folder, served, poisoned, caplog):
    _, url = served
    prompts = [f"w{4 + i} w{9 + i} w{20 + i}" for i in range(3)]
    expected = [greedy_text(folder, p, 12) for p in prompts]
    results: dict[str, tuple] = {}
    bodies = {p: {"prompt": p, "max_tokens": 12, "temperature": 0} for p in prompts}
    bodies["poison"] = {"prompt": "w1 w73 w2", "max_tokens": 12, "temperature": 0}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, post(url, bodies[k])))
               for k in bodies]
    for thread in threads[:-1]:
        thread.start()
    # The poisoned request joins once the good rows run (the engine's running gauge says 3).
    # Started together, it sometimes reached the engine first and failed in a step of its own,
    # and the shared step this test is about never happened.
    deadline = time.monotonic() + TIMEOUT
    while (running(url) < len(prompts) and time.monotonic() < deadline
           and all(thread.is_alive() for thread in threads[:-1])):
        time.sleep(0.005)
    threads[-1].start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    status, body, _ = results["poison"]
    shared = [r for r in caplog.records if "a step failed for requests" in r.getMessage()]
    assert shared and len(shared[0].args[0]) > 1  # the fault hit a step shared with others
    assert any("fails alone" in r.getMessage() for r in caplog.records)
    assert status == 500 and "injected fault" in body["error"]["message"]
    assert body["error"]["type"] == "server_error"
    assert [results[p][0] for p in prompts] == [200] * 3
    assert [results[p][1]["choices"][0]["text"] for p in prompts] == expected
    assert health(url)[0] == 200
    good(url)


def test_a_fault_mid_stream_ends_the_stream_with_an_error_event(served, poisoned):
    import openai

    _, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIError, match="injected fault"):
        for _ in client.completions.create(model="tiny", prompt="w73", max_tokens=8, stream=True):
            pass
    good(url)


def test_a_dead_engine_says_so_and_refuses_at_once(folder, monkeypatch):
    def broken(self):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(Decoder, "step", broken)
    local, url = start(folder)
    died = threading.Event()
    local.server.on_dead = died.set
    try:
        for _ in range(5):  # each request's step fails; past MAX_RECOVERIES the engine gives up
            status, _, _ = post(url, {"prompt": "w1", "max_tokens": 3})
            assert status in (500, 503)
            if died.is_set():
                break
        assert died.wait(TIMEOUT)
        code, body = health(url)
        assert code == 503 and body["status"] == "dead" and "failed steps" in body["reason"]
        begin = time.perf_counter()
        status, body, headers = post(url, {"prompt": "w1", "max_tokens": 3})
        assert status == 503 and "retry-after" in headers and time.perf_counter() - begin < 2
    finally:
        local.__exit__(None, None, None)


# -- a client that stops reading ------------------------------------------------------------------


def long_greedy_prompt(folder, tokens: int) -> str:
    """A prompt whose greedy answer runs the whole budget (no end-of-sequence)."""
    target, tokenizer = load_model(folder, device="cpu", dtype="float32")
    for i in range(20):
        prompt = f"w{5 + i} w{40 + i}"
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        result = autoregressive_generate(target, ids, max_new_tokens=tokens,
                                         eos_token_id=target.generation_config.eos_token_id)
        if len(result.sequences[0]) == tokens:
            return prompt
    raise AssertionError("no prompt of the tiny model runs to its budget")


def sse_texts(raw: bytes) -> dict[int, str]:
    """Each choice's text from a raw HTTP/1.1 response of server-sent events (ending [DONE])."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if b"transfer-encoding: chunked" in head.lower():  # undo the chunked framing
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            chunks.append(rest[: int(size, 16)])
            rest = rest[int(size, 16) + 2:]
        body = b"".join(chunks)
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def test_a_client_that_stops_reading_does_not_stall_the_others(folder, served):
    """A stream that its client stops reading (a small receive window, then nothing read)
    keeps decoding and the server keeps what it could not send, while other requests are
    answered in normal time; read later, the stream is whole and correct."""
    import fcntl
    import socket
    import struct
    import termios

    _, url = served
    budget = 240
    slow_prompt = long_greedy_prompt(folder, budget)
    slow_text = greedy_text(folder, slow_prompt, budget)
    prompts = [f"w{4 + i} w{9 + i} w{20 + i}" for i in range(6)]
    expected = [greedy_text(folder, p, 12) for p in prompts]
    host, port = url.removeprefix("http://").split(":")
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    slow.settimeout(TIMEOUT)
    slow.connect((host, int(port)))
    body = json.dumps({"prompt": slow_prompt, "max_tokens": budget, "n": 4, "logprobs": 5,
                       "temperature": 0, "stream": True}).encode()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body)
    try:
        deadline = time.time() + TIMEOUT
        while health(url)[1]["running"] < 4:  # the slow request decodes
            assert time.time() < deadline
            time.sleep(0.05)
        results: dict[str, tuple] = {}
        begin = time.perf_counter()
        threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, (
            post(url, {"prompt": p, "max_tokens": 12, "temperature": 0}),
            time.perf_counter() - begin))) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=TIMEOUT)
        assert [results[p][0][0] for p in prompts] == [200] * len(prompts)
        assert [results[p][0][1]["choices"][0]["text"] for p in prompts] == expected
        assert max(results[p][1] for p in prompts) < 10, results  # normal time, not blocked
        while health(url)[1]["running"] > 0:  # the engine finishes the unread stream too
            assert time.time() < deadline + TIMEOUT
            time.sleep(0.05)
        received = struct.unpack("i", fcntl.ioctl(slow, termios.FIONREAD, b"\0" * 4))[0]
        raw = b""
        while chunk := slow.recv(65536):
            raw += chunk
    finally:
        slow.close()
    # What the client had not received when decoding ended was still held by the server.
    assert len(raw) - received > 100_000, (len(raw), received)
    assert sse_texts(raw) == {i: slow_text for i in range(4)}
    good(url)


# -- reproduction 3: the waiting bound ------------------------------------------------------------


def test_requests_beyond_the_waiting_bound_get_503_with_retry_after(folder, monkeypatch):
    step = Decoder.step

    def slow(self):  # slow enough that 16 requests arrive while 1 decodes
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(Decoder, "step", slow)
    local, url = start(folder, max_batch=1, max_waiting=2)
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(
            url, {"prompt": "w1 w2", "max_tokens": 24, "temperature": 0}))) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=TIMEOUT)
        codes = sorted(r[0] for r in results)
        assert len(codes) == 16 and set(codes) == {200, 503}
        assert codes.count(200) <= 1 + 2 + 2  # running + waiting, + the few that finish early
        assert all(r[2].get("retry-after") for r in results if r[0] == 503)
        assert health(url)[1]["waiting"] == 0
        good(url)
    finally:
        local.__exit__(None, None, None)


# -- reproduction 2: shutdown ----------------------------------------------------------------------


def serve_process(folder, drain: float, said: list[str] | None = None
                  ) -> tuple[subprocess.Popen, str]:
    """``distillspec serve --port 0`` in a subprocess, and the URL it says it listens on (the
    lines it wrote until then go to ``said``)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "distillspec", "serve", "--target", str(folder), "--draft", "none",
         "--port", "0", "--device", "cpu", "--dtype", "float32", "--drain-seconds", str(drain)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        line = process.stderr.readline()
        if said is not None:
            said.append(line)
        if "listening on" in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep it drained
            return process, line.split("listening on ")[1].strip().removesuffix("/v1")
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("the server did not start")


def test_port_0_prints_the_port_it_bound(folder):
    said: list[str] = []
    process, url = serve_process(folder, drain=1.0, said=said)
    try:
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{port}" and port > 0
        assert not [line for line in said if ":0/" in line], said  # never the unbound port 0
        assert health(url) == (200, {"status": "ok", "running": 0, "waiting": 0,
                                     "draft_version": 0})
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory):
    """A model slow enough on the CPU that a long request is still running when SIGTERM comes."""
    root = tmp_path_factory.mktemp("slow")
    return save_tiny(root / "target", layers=6, hidden_size=256, intermediate_size=1024,
                     max_position_embeddings=8192, lm_scale=10.0, tokenizer=tiny_tokenizer())


def stuck_request(url: str) -> threading.Thread:
    """A long greedy request, returned once the server reports it running (greedy, so a sampled
    end-of-sequence cannot finish it early; polled, so a slow start on a busy machine is waited
    for instead of guessed)."""
    def ask():
        # The server goes away mid-answer, as it should.
        with contextlib.suppress(OSError, http.client.HTTPException):
            post(url, {"prompt": "w1", "max_tokens": 8000, "stream": True, "temperature": 0})

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while health(url)[1]["running"] != 1:
        assert time.time() < deadline and thread.is_alive(), "the long request never ran"
        time.sleep(0.1)
    time.sleep(0.5)  # decoding is under way
    return thread


@pytest.mark.slow
def test_sigterm_drains_then_exits_within_the_deadline_with_a_request_in_flight(slow_folder):
    process, url = serve_process(slow_folder, drain=1.0)
    try:
        stuck_request(url)
        begin = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        assert time.perf_counter() - begin <= 1.0 + 2.0
        assert process.returncode == 0  # drained, not the forced exit (1)
    finally:
        process.kill()


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once(slow_folder):
    process, url = serve_process(slow_folder, drain=60.0)
    try:
        stuck_request(url)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        begin = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        assert time.perf_counter() - begin < 2.0 and process.returncode == 128 + signal.SIGTERM
    finally:
        process.kill()


# -- fuzz: requests drawn from the server's own OpenAPI schema -------------------------------------


def strategy(schema: dict):
    """Hypothesis strategy for the JSON-schema subset our OpenAPI document uses (object with
    properties and required keys, string, integer, number, boolean, null, array, anyOf, enum,
    const)."""
    from hypothesis import strategies as st

    if "const" in schema:
        return st.just(schema["const"])
    if schema.get("type") == "null":
        return st.none()
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([strategy(option) for option in schema["anyOf"]])
    kind = schema["type"]
    if kind == "object":
        properties, required = schema["properties"], set(schema.get("required", ()))
        optional = [k for k in properties if k not in required]
        return st.fixed_dictionaries(
            {k: strategy(properties[k]) for k in required},
            optional={k: strategy(properties[k]) for k in optional})
    if kind == "array":
        return st.lists(strategy(schema["items"]), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0),
                       max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema)
    if kind == "boolean":
        return st.booleans()
    raise AssertionError(f"schema kind {kind!r} has no strategy here: extend strategy()")


def test_fuzz_from_the_openapi_schema_never_hangs_or_kills_the_engine(served):
    import hypothesis
    from hypothesis import strategies as st

    _, url = served
    with urllib.request.urlopen(url + "/openapi.json", timeout=TIMEOUT) as response:
        spec = json.loads(response.read())
    schemas = {}
    for path in ("/v1/completions", "/v1/chat/completions"):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        fields = schema["properties"]  # keep every case short: few tokens, few choices
        fields["max_tokens"] = {**fields["max_tokens"]["anyOf"][0], "maximum": 8}  # not null
        fields["max_completion_tokens"]["anyOf"][0]["maximum"] = 8
        fields["n"]["anyOf"][0]["maximum"] = 2
        schema["required"].append("max_tokens")
        schemas[path] = strategy(schema)
    junk = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**80), 2**80)
        | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                    max_size=4),
        max_leaves=8)

    def broken(body: dict):  # a valid body with one field replaced by anything at all
        return st.sampled_from(sorted(body)).flatmap(
            lambda key: junk.map(lambda value: {**body, key: value}))

    cases = st.sampled_from(sorted(schemas)).flatmap(
        lambda path: st.tuples(st.just(path), schemas[path].flatmap(
            lambda body: st.one_of(st.just(body), broken(body)))))
    seen = {"cases": 0, "ok": 0}

    @hypothesis.settings(max_examples=200, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(cases)
    def check(case):
        path, body = case
        seen["cases"] += 1
        status, reply, _ = post(url, body, path)
        assert status in (200, 400, 404), (status, reply)
        seen["ok"] += status == 200
        if "events" in reply:  # a stream: chunks then [DONE], never an error event
            assert reply["events"][-1] == "[DONE]" and '"error"' not in "".join(reply["events"])
        elif status != 200:
            assert set(reply["error"]) == {"message", "type", "param", "code"}

    check()
    print(f"fuzz: {seen['cases']} cases, {seen['ok']} answered 200")
    assert seen["ok"] > 0  # the valid half of the cases really decoded
    assert health(url)[0] == 200
    good(url)

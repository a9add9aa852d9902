"""``distillspec serve`` on loopback, talked to with the official openai client (and raw HTTP)."""

from __future__ import annotations

import json
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
import torch
from conftest import start_tiny_server

from distillspec import autoregressive_generate
from distillspec.models.loading import load_model

openai = pytest.importorskip("openai")
KEY = "test-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    local, url = start_tiny_server(root, api_key=KEY)
    target, tok = load_model(root / "target", device="cpu", dtype="float32")
    yield {"url": url, "local": local, "target": target, "tokenizer": tok,
           "client": openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)}
    local.__exit__(None, None, None)


def greedy_text(served, prompt: str, max_tokens: int) -> str:
    tokenizer = served["tokenizer"]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    result = autoregressive_generate(served["target"], ids, max_new_tokens=max_tokens,
                                     eos_token_id=served["target"].generation_config.eos_token_id)
    return tokenizer.decode(result.sequences[0], skip_special_tokens=True)


def prompt_of(i: int) -> str:
    return " ".join(f"w{(i * 7 + j * 3) % 90}" for j in range(3 + i % 5))


def test_the_server_times_its_kernel_choices_before_serving(tmp_path, monkeypatch):
    """Every float32 kernel choice (packed_linear) of 2..64 rows is timed at start, so no
    request pays one mid-step; the tiny float32 models make these choices on any CPU."""
    from distillspec.decoding import packed_linear

    monkeypatch.setattr(packed_linear, "_weight_major", {})  # none made by earlier tests
    local, url = start_tiny_server(tmp_path, api_key=KEY)
    try:
        assert local.server.warmed_choices == packed_linear.tunings() > 0
        for model in local.server.engine.models[:2]:
            for m in (m for m in model.modules() if type(m) is torch.nn.Linear):
                widths = [rows for rows in range(2, packed_linear.TUNED_MAX_ROWS + 1)
                          if rows * m.weight.numel() <= packed_linear.TUNED_MAX_MACS]
                assert all((m.out_features, m.in_features, rows, torch.get_num_threads())
                           in packed_linear._weight_major for rows in widths)
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        client.completions.create(model="tiny", prompt=prompt_of(3) * 9, max_tokens=8,
                                  temperature=0, n=3)
        assert packed_linear.tunings() == local.server.warmed_choices
    finally:
        local.__exit__(None, None, None)


def test_completions_streaming_and_not_equal_the_target_greedy(served):
    client = served["client"]
    prompt = prompt_of(1)
    expected = greedy_text(served, prompt, 12)
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected and reply.object == "text_completion"
    assert reply.usage.prompt_tokens == len(served["tokenizer"](prompt)["input_ids"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert streamed == expected
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completions_apply_the_template(served):
    client = served["client"]
    messages = [{"role": "user", "content": prompt_of(2)}]
    expected = greedy_text(served, served["tokenizer"].apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True), 10)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                           temperature=0)
    assert reply.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_sixteen_simultaneous_streams_each_equal_their_batch1_answer(served):
    client = served["client"]
    prompts = [prompt_of(i) for i in range(16)]
    expected = [greedy_text(served, p, 10) for p in prompts]
    results, errors = [None] * 16, []

    def ask(i: int) -> None:
        try:
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10,
                                               temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and results == expected


def test_seeded_sampling_and_stop_strings(served):
    client = served["client"]
    prompt = prompt_of(3)
    a, b = (client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0,
                                      seed=7).choices[0].text for _ in range(2))
    assert a == b
    full = greedy_text(served, prompt, 12)
    stop = full.split()[3]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                      stop=[stop])
    assert reply.choices[0].text == full[: full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_stop_helpers_find_the_cut_and_the_text_to_hold_back():
    from distillspec.tools.serve import held_back, stop_cut

    assert stop_cut("an endless wonder and awe", ["wonder and", "awe"]) == len("an endless ")
    assert stop_cut("an endless wonder", ["wonder and"]) is None
    assert held_back("an endless wonder", ["wonder and"]) == len("wonder")
    assert held_back("an endless wonder an", ["wonder and", "x"]) == len("wonder an")
    assert held_back("an endless w", ["xyz", "wonder"]) == 1
    assert held_back("an endless", ["wonder"]) == 0 and held_back("", ["wonder"]) == 0
    assert held_back("xaba", ["abab"]) == 3  # the longest end that starts a stop string


def block_boundary_stops(served, prompt: str, max_tokens: int) -> tuple[str, list[str]]:
    """The greedy text the server streams without a stop string, and every stop string of two
    words that spans the end of one streamed block and the start of the next (the case where
    the first word was sent before the second was decoded)."""
    chunks = [c.choices[0].text for c in served["client"].completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)]
    chunks = [c for c in chunks if c.strip()]
    stops = [f"{a.split()[-1]} {b.split()[0]}" for a, b in zip(chunks, chunks[1:])]
    return "".join(chunks), stops


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_across_tokens_is_never_sent(served, stream):
    client = served["client"]
    prompt = prompt_of(5)
    full, stops = block_boundary_stops(served, prompt, 16)
    assert full == greedy_text(served, prompt, 16) and len(stops) >= 2
    for stop in stops:
        expected = full[: full.find(stop)]
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                          temperature=0, stop=[stop], stream=stream)
        if stream:
            chunks = list(reply)
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert (text, reason) == (expected, "stop"), stop


def test_a_held_back_partial_stop_is_sent_when_it_does_not_complete(served):
    """The text that could start a stop string waits, and is sent once the next token rules the
    stop out, or when the request ends by length while it still waits."""
    client = served["client"]
    prompt = prompt_of(5)
    full = greedy_text(served, prompt, 16)
    words = full.split()
    stop = [f"{words[1]} w999", f"{words[-1]} w999"]  # w999 is not in the vocabulary
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": prompt}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                           temperature=0)
    answer = reply.choices[0].message.content
    cut = answer.split()[2]
    chat_stop = f"{answer.split()[1]} {cut}"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                 temperature=0, stop=chat_stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer[
        : answer.find(chat_stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def raw(served, path: str, body, key: str | None = KEY, method: str = "POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(served["url"].removesuffix("/v1") + path, data=data,
                                     method=method, headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(
    "body,key,status,needle",
    [
        (b"{not json", KEY, 400, "not valid JSON"),
        ({"model": "nope", "prompt": "w1"}, KEY, 404, "does not exist"),
        ({"model": "tiny", "prompt": "w1", "max_tokens": -3}, KEY, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "w1", "max_tokens": 10**9}, KEY, 400, "context"),
        ({"model": "tiny", "prompt": " ".join(["w5"] * 300)}, KEY, 400, "context"),
        ({"model": "tiny", "prompt": "w1", "temperature": 9}, KEY, 400, "temperature"),
        ({"model": "tiny", "prompt": "w1", "n": 17}, KEY, 400, "n must be"),
        ({"model": "tiny", "prompt": "w1"}, None, 401, "API key"),
        ({"model": "tiny", "prompt": "w1"}, "wrong", 401, "API key"),
    ],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(served, body, key, status,
                                                                     needle):
    code, payload = raw(served, "/v1/completions", body, key)
    assert code == status and needle in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    ok, reply = raw(served, "/v1/completions", {"model": "tiny", "prompt": "w1", "max_tokens": 2})
    assert ok == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_client_that_disconnects_mid_stream_is_cleaned_up(served):
    import http.client

    host = served["url"].removeprefix("http://").removesuffix("/v1")
    connection = http.client.HTTPConnection(host, timeout=30)
    body = json.dumps({"model": "tiny", "prompt": prompt_of(4), "max_tokens": 200,
                       "stream": True})
    connection.request("POST", "/v1/completions", body, {
        "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 200
    response.read(64)  # the first chunk or so, then hang up
    connection.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        health = json.loads(urllib.request.urlopen(
            served["url"].removesuffix("/v1") + "/health").read())
        if health["running"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.1)
    assert health["running"] == 0 and health["waiting"] == 0
    assert raw(served, "/v1/completions", {"model": "tiny", "prompt": "w1", "max_tokens": 2})[0] == 200


def test_metrics_in_prometheus_format(served):
    # Alone (batch 1), two 12-token answers take more steps than --sd-policy auto's warm-up
    # (each of speculate, gamma1 and plain measured twice), whatever ran before.
    for i in range(2):
        served["client"].completions.create(model="tiny", prompt=prompt_of(i), max_tokens=12,
                                            temperature=0)
    text = urllib.request.urlopen(served["url"].removesuffix("/v1") + "/metrics").read().decode()
    for mode in ("speculate", "gamma1", "plain"):
        assert f'distillspec_spec_decode_steps_total{{mode="{mode}"}}' in text, mode
        assert (f'distillspec_spec_decode_mode_tokens_per_second_per_row{{batch_bucket="1",mode="{mode}"}}'
                in text), mode
    for name in ("distillspec_spec_decode_num_draft_tokens_total",
                 "distillspec_spec_decode_num_accepted_tokens_total",
                 "distillspec_spec_decode_num_emitted_tokens_total",
                 "distillspec_time_to_first_token_seconds_bucket",
                 "distillspec_time_per_output_token_seconds_bucket",
                 "distillspec_num_requests_running", "distillspec_draft_version",
                 "distillspec_spec_decode_plain_from_batch",
                 'distillspec_spec_decode_position_accepted_total{position="0"}',
                 'distillspec_speculation_info{confidence_threshold="0",draft="target-layers:1",'
                 'draft_weights="none",gamma="3",lookup="0",sd_margin="0.1",sd_policy="auto",tree=""} 1.0',
                 'distillspec_requests_total{endpoint="/v1/completions",status="200"}'):
        assert name in text, name


def test_the_mode_policy_skips_steps_that_admitted_rows_or_timed_a_kernel(monkeypatch):
    """A step that prefilled a joining row, or timed a kernel choice (a one-off cost of a new
    call width), says nothing of its arm's speed: the server's policy must not record it."""
    from conftest import tiny_model

    from distillspec.decoding import packed_linear
    from distillspec.decoding.engine import Decoder
    from distillspec.decoding.mode_policy import ModePolicy
    from distillspec.decoding.params import SpeculationConfig
    from distillspec.decoding.requests import Request
    from distillspec.tools.serve_engine import EngineWorker

    steps, timed_at = [0], {2, 5}  # these steps (1-based) "time a kernel"
    real_step = Decoder.step

    def step(self):
        steps[0] += 1
        return real_step(self)

    monkeypatch.setattr(Decoder, "step", step)
    monkeypatch.setattr(packed_linear, "tunings",
                        lambda: sum(1 for s in timed_at if s <= steps[0]))
    policy = ModePolicy.for_speculation(3, tree=False)
    recorded = []
    monkeypatch.setattr(policy, "record", lambda *args: recorded.append(steps[0]))
    worker = EngineWorker(tiny_model(seed=0), tiny_model(seed=1, layers=1),
                          SpeculationConfig(gamma=3), max_batch=4, policy=policy)
    worker.decoder.add(Request([5, 6, 7], 24))
    while worker.decoder.has_work:
        worker._step()
    assert steps[0] > 6
    assert recorded == [s for s in range(2, steps[0] + 1) if s not in timed_at]  # 1 admitted


def test_the_mode_policy_skips_the_step_that_catches_the_draft_up_after_plain_steps(monkeypatch):
    """Plain steps leave the draft tokens to read; the next drafting step reads them all (a
    one-off cost of switching arms) and must not be recorded; the one after it is."""
    from conftest import tiny_model

    from distillspec.decoding.mode_policy import PLAIN, ModePolicy
    from distillspec.decoding.params import SpeculationConfig
    from distillspec.decoding.requests import Request
    from distillspec.tools.serve_engine import EngineWorker

    policy = ModePolicy.for_speculation(3, tree=False)
    plan = iter([None, PLAIN, PLAIN, PLAIN, None, None, PLAIN, None])  # the arm of steps 1..8
    monkeypatch.setattr(policy, "choose", lambda batch: next(plan, None))
    recorded, steps = [], [0]
    monkeypatch.setattr(policy, "record",
                        lambda batch, arm, tokens, seconds: recorded.append((steps[0], arm)))
    worker = EngineWorker(tiny_model(seed=0), tiny_model(seed=1, layers=1),
                          SpeculationConfig(gamma=3), max_batch=4, policy=policy)
    worker.decoder.add(Request([5, 6, 7], 40))
    while worker.decoder.has_work and steps[0] < 9:
        steps[0] += 1
        worker._step()
    # 1 admitted; 5 read 3 skipped tokens; 8 follows one plain step (the draft has at most 3 to
    # read then: 1 or 2 left by the chain, plus the plain step's token)
    assert recorded[:4] == [(2, PLAIN), (3, PLAIN), (4, PLAIN), (6, None)]
    assert (5, None) not in recorded


@pytest.mark.parametrize("seeded", [False, True])
def test_a_step_admitting_rows_runs_a_chain_of_the_trees_depth(monkeypatch, seeded):
    """Where the policy chose the tree for a step that admits rows, the step runs a chain of the
    tree's depth, whose verify pass reads the joining prompts (no target prefill), and greedy
    rows stay the target's own tokens; while a seeded sampled row is live it speculates as
    configured (its answer depends on its draft lengths) and the joining rows get a prefill."""
    from conftest import tiny_model

    from distillspec import autoregressive_generate
    from distillspec.decoding.mode_policy import ModePolicy
    from distillspec.decoding.params import SamplingConfig, SpeculationConfig
    from distillspec.decoding.requests import Request
    from distillspec.tools.serve_engine import EngineWorker, Job

    policy = ModePolicy.for_speculation(3, tree=True)
    monkeypatch.setattr(policy, "choose", lambda batch: None)  # the tree, every step
    target, finished = tiny_model(seed=0), {}
    worker = EngineWorker(target, tiny_model(seed=1, layers=1),
                          SpeculationConfig(gamma=3, tree="3:1"), max_batch=4, policy=policy,
                          on_finished=lambda request, output: finished.__setitem__(
                              request.request_id, list(output)))
    limits, real_step = [], worker.decoder.step

    def step():
        limits.append((bool(worker.decoder.queue), worker.decoder.lookahead_limit))
        return real_step()

    monkeypatch.setattr(worker.decoder, "step", step)
    nobody = types.SimpleNamespace(call_soon_threadsafe=lambda *args: None)

    def send(request):  # as the server's handler does
        worker._pending += 1
        worker._handle("add", Job(request, nobody, types.SimpleNamespace(put_nowait=None)))

    if seeded:
        send(Request([4, 4, 2], 30, SamplingConfig(temperature=1.0), seed=3, request_id="s"))
    joins = {0: [5, 6, 7], 3: [8, 9, 10, 11, 12], 6: [13, 14]}
    for index in range(40):
        if index in joins:
            send(Request(joins[index], 12, request_id=index))
        worker._admit()
        if worker.decoder.has_work:
            worker._step()
    admitting = {limit for joined, limit in limits if joined}
    assert admitting == ({None} if seeded else {1})  # 3:1 is one level deep
    assert {limit for joined, limit in limits if not joined} == {None}
    prefills = worker.decoder.metrics.target_prefill_passes
    assert prefills == (3 if seeded else 0)  # seeded: each of the 3 admissions prefills
    for index, prompt in joins.items():
        plain = autoregressive_generate(target, torch.tensor([prompt]), max_new_tokens=12)
        assert finished[index] == plain.sequences[0]


@pytest.mark.parametrize("settled", [False, True])
def test_rows_joining_where_plain_has_settled_skip_the_drafts_prefill(monkeypatch, settled):
    """A batch size the policy settled on plain admits rows without prefilling the draft (a row
    that ends on plain steps never costs the draft anything); elsewhere a plain step still
    prefills it, since the policy may draft at the next step."""
    from conftest import tiny_model

    from distillspec.decoding.mode_policy import PLAIN, ModePolicy
    from distillspec.decoding.params import SpeculationConfig
    from distillspec.decoding.requests import Request
    from distillspec.tools.serve_engine import EngineWorker

    policy = ModePolicy.for_speculation(3, tree=False)
    monkeypatch.setattr(policy, "choose", lambda batch: PLAIN)
    monkeypatch.setattr(policy, "settled", lambda size: settled)
    worker = EngineWorker(tiny_model(seed=0), tiny_model(seed=1, layers=1),
                          SpeculationConfig(gamma=3), max_batch=4, policy=policy)
    worker.decoder.add(Request([5, 6, 7], 6))
    worker.decoder.add(Request([8, 9, 10, 11], 6))
    while worker.decoder.has_work:
        worker._step()
    assert worker.decoder.metrics.draft_forward_passes == (0 if settled else 1)

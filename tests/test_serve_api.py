"""The OpenAI API as real clients use it: log-probabilities (the target's, checked against a
direct forward), echo, token-id and batched prompts, n, stream usage, content parts, and every
request field of the installed ``openai`` package either honoured or refused with its name."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from conftest import perturbed_copy, start_tiny_server, tiny_model

from distillspec import Decoder, Request
from distillspec.decoding.logprobs import host_logprobs, token_logprobs
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.models.loading import load_model

openai = pytest.importorskip("openai")
PROMPT = "w5 w17 w3 w40 w8"
TOL = 1e-4  # float32: the verify pass and a direct forward round differently, barely


# -- the pure part ---------------------------------------------------------------------------------


def test_token_logprobs_are_the_log_softmax_and_its_top():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=generator)
    tokens = torch.tensor([[1, 2, 3], [6, 0, 5]])
    chosen, values, ids = token_logprobs(logits, tokens, 2)
    reference = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(chosen, reference.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    assert torch.equal(ids, reference.topk(2, dim=-1).indices)
    rows = host_logprobs(logits, tokens, [None, 1])
    assert rows[0] is None and len(rows[1]) == 3 and len(rows[1][0].top) == 1
    assert rows[1][2].logprob == pytest.approx(float(reference[1, 2, 5]), abs=1e-6)
    assert rows[1][0].top[0][0] == int(reference[1, 0].argmax())
    assert host_logprobs(logits, tokens, [None, None]) == [None, None]


def reference_logprobs(target, ids: list[int]) -> torch.Tensor:
    """log_softmax of the target's logits over the whole sequence: row t scores ids[t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(target(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_entries(reference: torch.Tensor, ids: list[int], start: int, entries, top: int):
    """entries[j] is the token ids[start + j], scored by reference row start + j - 1."""
    assert len(entries) == len(ids) - start
    for j, entry in enumerate(entries):
        row = reference[start + j - 1]
        assert entry.logprob == pytest.approx(float(row[ids[start + j]]), abs=TOL)
        assert [i for i, _ in entry.top] == row.topk(top).indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(row.topk(top).values.tolist(), abs=TOL)


@pytest.mark.parametrize("mode", ["plain", "sampled", "greedy", "tree"])
def test_decoder_logprobs_are_the_targets_whatever_produced_the_tokens(mode):
    """Rows of different lengths in one batch; the draft only partly agrees with the target, so
    tokens come from accepted drafts, residuals and bonus tokens alike."""
    target = tiny_model("llama", seed=0, lm_scale=4.0)
    draft = None if mode == "plain" else perturbed_copy(target, 0.5)
    speculation = SpeculationConfig(gamma=3, tree="4:2" if mode == "tree" else "")
    decoder = Decoder(target, draft, speculation)
    sampling = SamplingConfig(temperature=1.0 if mode in ("sampled", "plain") else 0.0)
    prompts = [[5, 9, 11], [7, 3, 20, 21, 40, 41], [12]]
    for i, prompt in enumerate(prompts):
        decoder.add(Request(prompt, 12, sampling, seed=i, request_id=i, logprobs=3,
                            prompt_logprobs=2 if i else None))
    outputs = {i: [] for i in range(3)}
    entries = {i: [] for i in range(3)}
    scored = {}
    while decoder.has_work:
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
            entries[update.request_id] += update.logprobs or []
            if update.prompt_logprobs is not None:
                scored[update.request_id] = update.prompt_logprobs
    assert sorted(scored) == [1, 2] and decoder.metrics.target_forward_passes > 0
    for i, prompt in enumerate(prompts):
        full = prompt + outputs[i]
        reference = reference_logprobs(target, full)
        check_entries(reference, full, len(prompt), entries[i], 3)
        if i:
            assert scored[i][0] is None
            check_entries(reference, prompt, 1, scored[i][1:], 2)


def test_a_scoring_request_with_no_budget_returns_only_its_prompt_logprobs():
    target = tiny_model("llama", seed=0, lm_scale=4.0)
    decoder = Decoder(target)
    prompt = [4, 8, 15, 16, 23, 42]
    decoder.add(Request(prompt, 0, request_id="s", prompt_logprobs=0))
    decoder.add(Request([5, 6], 4, request_id="g"))
    updates = decoder.step()
    scoring = [u for u in updates if u.request_id == "s"]
    assert [u.finished for u in scoring] == [False, True] and scoring[1].finish_reason == "length"
    assert all(u.new_tokens == [] for u in scoring)
    check_entries(reference_logprobs(target, prompt), prompt, 1, scoring[0].prompt_logprobs[1:], 0)
    with pytest.raises(ValueError, match="0 with prompt_logprobs"):
        decoder.add(Request(prompt, 0))


# -- the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-api")
    local, url = start_tiny_server(root, lm_scale=4.0)
    target, tok = load_model(root / "target", device="cpu", dtype="float32")
    yield {"url": url, "target": target, "tokenizer": tok, "folder": root / "target",
           "client": openai.OpenAI(base_url=url, api_key="none", max_retries=0)}
    local.__exit__(None, None, None)


def post(served, path: str, body: dict):
    """(status, JSON body, or the list of events of a stream)."""
    request = urllib.request.Request(served["url"] + path, data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
                return response.status, [json.loads(e) for e in events[:-1]] + [events[-1]]
            return response.status, json.loads(text)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def ids_of(served, text: str) -> list[int]:
    return served["tokenizer"](text)["input_ids"]


def answer_ids(served, text: str, finish: str, count: int) -> list[int]:
    """The token ids of an answer: its text re-tokenized, and the eos it stopped on (text
    skips special tokens, so the answer must hold no other special token: checked)."""
    tokenizer = served["tokenizer"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids += [tokenizer.eos_token_id] if finish == "stop" else []
    assert len(ids) == count, "a special token inside the answer: pick another prompt"
    return ids


def test_completion_logprobs_are_the_targets_and_tile_the_text(served):
    """Greedy through SD (a 1-layer draft of the target: some drafts accepted, some not)."""
    client = served["client"]
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10,
                                      temperature=0, logprobs=3)
    choice = reply.choices[0]
    out, prompt = choice.logprobs, ids_of(served, PROMPT)
    full = prompt + answer_ids(served, choice.text, choice.finish_reason, len(out.tokens))
    reference = reference_logprobs(served["target"], full)
    vocab = served["tokenizer"].get_vocab()
    for j, (logprob, top) in enumerate(zip(out.token_logprobs, out.top_logprobs)):
        row = reference[len(prompt) + j - 1]
        assert logprob == pytest.approx(float(row[full[len(prompt) + j]]), abs=TOL)
        assert max(top.values()) == pytest.approx(float(row.max()), abs=TOL)
        assert len(top) <= 4  # the 3 most likely, and the taken token when it is not among them
        for text, value in top.items():  # special tokens show as "" (their text)
            if text.strip():
                assert value == pytest.approx(float(row[vocab[text.strip()]]), abs=TOL)
    assert "".join(out.tokens) == choice.text
    # OpenAI's text_offset: into the prompt followed by the answer, also without echo (vLLM
    # counts from the answer's start there); so the first is the prompt's length
    assert out.text_offset[0] == len(PROMPT)
    whole = PROMPT + choice.text
    assert all(whole[o:].startswith(t) for o, t in zip(out.text_offset, out.tokens))
    assert reply.usage.completion_tokens == len(out.tokens)


def test_echo_with_max_tokens_0_scores_the_prompt_as_lm_eval_asks(served):
    ids = ids_of(served, PROMPT)
    status, body = post(served, "/completions", {"prompt": [ids], "max_tokens": 0, "echo": True,
                                                 "logprobs": 1, "temperature": 0})
    assert status == 200
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    out = choice["logprobs"]
    assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
    reference = reference_logprobs(served["target"], ids)
    expected = [float(reference[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert out["token_logprobs"][1:] == pytest.approx(expected, abs=TOL)
    assert "".join(out["tokens"]) == PROMPT and out["text_offset"][0] == 0
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                             "total_tokens": len(ids)}
    # lm-eval's loglikelihood request: echo, max_tokens 1, logprobs 1; its last token dropped
    status, body = post(served, "/completions", {"prompt": [ids], "max_tokens": 1, "echo": True,
                                                 "logprobs": 1, "temperature": 0, "seed": 1234})
    scored = body["choices"][0]["logprobs"]["token_logprobs"]
    assert status == 200 and scored[1:-1] == pytest.approx(expected, abs=TOL)
    assert len(scored) == len(ids) + 1


def merged_logprobs(events) -> tuple[str, dict]:
    """The streamed text and log-probabilities, checking that each token came with the chunk
    that completed its text (the last chunk: with the rest)."""
    chunks, text = [e["choices"][0] for e in events[:-1]], ""
    assert events[-1] == "[DONE]"
    for chunk in chunks:
        text += chunk["text"]
        logprobs = chunk["logprobs"]
        ends = [o + len(t) for o, t in zip(logprobs["text_offset"], logprobs["tokens"])]
        assert chunk["finish_reason"] or all(end <= len(text) for end in ends)
        assert chunk["finish_reason"] or not ends or ends[-1] > len(text) - len(chunk["text"])
    return text, {key: sum((c["logprobs"][key] for c in chunks), [])
                  for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def test_streamed_logprobs_add_up_to_the_whole_answer(served):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 2, "echo": True}
    status, whole = post(served, "/completions", body)
    assert status == 200
    full, expected = whole["choices"][0]["text"], whole["choices"][0]["logprobs"]
    for stop in ("w999 w998", " ".join(full[len(PROMPT):].split()[2:4])):
        status, events = post(served, "/completions", {**body, "stream": True, "stop": stop})
        text, merged = merged_logprobs(events)
        cut = full.find(stop, len(PROMPT))
        assert status == 200 and text == (full if cut < 0 else full[:cut])
        kept = len(merged["tokens"])  # at a stop string: the tokens whose text starts before it
        assert all(offset < len(text) for offset in merged["text_offset"][: kept - 1])
        assert merged["tokens"] == expected["tokens"][:kept]
        assert merged["text_offset"] == expected["text_offset"][:kept]
        assert merged["token_logprobs"][1:] == pytest.approx(expected["token_logprobs"][1:kept],
                                                             abs=TOL)
        assert "".join(merged["tokens"]).startswith(text)
        assert (cut < 0) == (kept == len(expected["tokens"]))


def test_text_offsets_count_from_the_prompts_start_with_echo_or_without(served):
    """OpenAI's ``text_offset``: where each token starts in the prompt followed by the answer,
    so an answer's offsets are the same with and without echo (vLLM starts them at 0 without
    echo), streamed or not."""
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    echoed = post(served, "/completions", {**body, "echo": True})[1]["choices"][0]["logprobs"]
    plain = post(served, "/completions", body)[1]["choices"][0]["logprobs"]
    status, events = post(served, "/completions", {**body, "stream": True})
    streamed = sum((e["choices"][0]["logprobs"]["text_offset"] for e in events[:-1]), [])
    prompt = len(ids_of(served, PROMPT))
    assert status == 200 and plain["tokens"] == echoed["tokens"][prompt:]
    assert plain["text_offset"][0] == len(PROMPT) == echoed["text_offset"][prompt]
    assert plain["text_offset"] == echoed["text_offset"][prompt:] == streamed


def test_chat_logprobs_and_top_logprobs(served):
    client = served["client"]
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=2)
    choice = reply.choices[0]
    content = choice.logprobs.content
    text = served["tokenizer"].apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)
    prompt = served["tokenizer"](text, add_special_tokens=False)["input_ids"]
    full = prompt + answer_ids(served, choice.message.content, choice.finish_reason,
                               len(content))
    reference = reference_logprobs(served["target"], full)
    for j, token in enumerate(content):
        row = reference[len(prompt) + j - 1]
        assert token.logprob == pytest.approx(float(row[full[len(prompt) + j]]), abs=TOL)
        assert token.bytes == list(token.token.encode())
        assert [t.logprob for t in token.top_logprobs] == pytest.approx(
            row.topk(2).values.tolist(), abs=TOL)
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                           temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == reply.choices[0].message.content


def test_token_id_and_batched_prompts_give_one_choice_each_in_order(served):
    client = served["client"]
    prompts = [PROMPT, "w1 w2", "w60 w61 w62"]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0)
             .choices[0].text for p in prompts]
    as_ids = client.completions.create(model="tiny", prompt=ids_of(served, PROMPT), max_tokens=6,
                                       temperature=0)
    assert as_ids.choices[0].text == alone[0]
    for prompt in (prompts, [ids_of(served, p) for p in prompts]):
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                          temperature=0)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert [c.text for c in reply.choices] == alone
        assert reply.usage.prompt_tokens == sum(len(ids_of(served, p)) for p in prompts)


def test_n_choices_have_their_own_seeds_derived_from_the_requests(served):
    client = served["client"]
    ask = dict(model="tiny", max_tokens=8, temperature=1.5, seed=11)
    single = client.completions.create(prompt=PROMPT, **ask).choices[0].text
    first = client.completions.create(prompt=[PROMPT, "w1 w2"], n=3, **ask)
    again = client.completions.create(prompt=[PROMPT, "w1 w2"], n=3, **ask)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == list(range(6))
    assert texts == [c.text for c in again.choices]  # reproducible
    assert texts[0] == single  # choice 0 keeps the request's own seed
    assert len(set(texts[:3])) > 1  # the choices of one prompt are different samples
    chat = client.chat.completions.create(messages=[{"role": "user", "content": PROMPT}], n=2,
                                          **ask)
    assert [c.index for c in chat.choices] == [0, 1]


def test_stream_options_include_usage_ends_with_a_usage_chunk(served):
    body = {"prompt": [PROMPT, "w1 w2"], "n": 2, "max_tokens": 5, "temperature": 0}
    _, whole = post(served, "/completions", body)
    status, events = post(served, "/completions", {**body, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    assert all(e["usage"] is None for e in events[:-2])
    for index in range(4):
        text = "".join(e["choices"][0]["text"] for e in events[:-2]
                       if e["choices"][0]["index"] == index)
        assert text == whole["choices"][index]["text"]
    ask = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
               temperature=0)
    reply = served["client"].chat.completions.create(**ask)
    chunks = list(served["client"].chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage == reply.usage and chunks[-1].choices == []


def test_content_parts_are_joined_and_other_parts_refused(served):
    client = served["client"]
    ask = dict(model="tiny", max_tokens=6, temperature=0)
    joined = client.chat.completions.create(
        messages=[{"role": "user", "content": "w5 w6\nw7"}], **ask).choices[0].message.content
    parts = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "text", "text": "w5 w6"}, {"type": "text", "text": "w7"}]}], **ask)
    assert parts.choices[0].message.content == joined
    status, body = post(served, "/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "messages.[0].content.[0].type"
    status, body = post(served, "/chat/completions", {"messages": [
        {"role": "tool", "content": "x", "tool_call_id": "1"}], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "messages.[0].role"


def test_top_k_1_is_greedy(served):
    greedy = post(served, "/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    top1 = post(served, "/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 2,
                                         "top_k": 1, "seed": 5})
    hot = post(served, "/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 2,
                                        "seed": 5})
    assert top1[1]["choices"][0]["text"] == greedy[1]["choices"][0]["text"]
    assert hot[1]["choices"][0]["text"] != greedy[1]["choices"][0]["text"]


# -- every field of the OpenAI request: honoured, or refused by name ---------------------------


def text_of(body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


# What must hold of a reply (against the greedy baseline) when a field is honoured.
def unchanged(body, baseline):  # the field's "off" value, or an identifier with no effect
    return text_of(body) == text_of(baseline)


def one_token(body, baseline):
    choice = body["choices"][0]
    return body["usage"]["completion_tokens"] == 1 and choice["finish_reason"] == "length"


def two_choices(body, baseline):
    return [c["index"] for c in body["choices"]] == [0, 1]


def has_logprobs(body, baseline):
    logprobs = body["choices"][0]["logprobs"]
    return logprobs is not None and len(logprobs.get("content") or logprobs["tokens"]) > 0


def echoed(body, baseline):
    return body["choices"][0]["text"] == PROMPT + text_of(baseline)


def stopped(body, baseline):
    text = text_of(body)
    return len(text) < len(text_of(baseline)) and text_of(baseline).startswith(text)


def third_word(baseline):
    return text_of(baseline).split()[2]


REFUSED, STREAM, SEED = "refused", "stream", "seed"
# field: [(value or value(baseline), expectation)]. Expectation: a check of the reply against the
# greedy baseline; REFUSED (400, param = the field); an HTTP status; STREAM (events ending with a
# usage chunk and [DONE]); SEED (a sample at temperature 1.5 that repeats). The fields are those
# of the OpenAI reference (openai's completion_create_params for each endpoint): the test fails
# when the installed package lists one that is not decided here.
COMMON_PROBES = {
    "model": [("tiny", unchanged), ("other", 404)],
    "max_tokens": [(1, one_token), (-1, REFUSED)],
    "temperature": [(0, unchanged), (5, REFUSED)],
    "top_p": [(1e-9, unchanged), (0, REFUSED)],  # sent at temperature 1: top_p 1e-9 is greedy
    "n": [(2, two_choices), (17, REFUSED)],
    "seed": [(9, SEED), (2**70, REFUSED)],
    "stop": [(third_word, stopped), (["a"] * 5, REFUSED)],
    "stream": [(True, STREAM), ("yes", REFUSED)],
    "stream_options": [({"include_usage": True}, STREAM),
                       ({"include_obfuscation": True}, REFUSED)],
    "frequency_penalty": [(0, unchanged), (0.5, REFUSED)],
    "presence_penalty": [(0.0, unchanged), (-1, REFUSED)],
    "logit_bias": [({}, unchanged), ({"5": 10}, REFUSED)],
    "user": [("alice", unchanged), (7, REFUSED)],
}
COMPLETION_PROBES = COMMON_PROBES | {
    "prompt": [(PROMPT, unchanged), ("", REFUSED)],
    "echo": [(True, echoed), ("no", REFUSED)],
    "logprobs": [(2, has_logprobs), (21, REFUSED)],
    "best_of": [(1, unchanged), (3, REFUSED)],
    "suffix": [("", unchanged), ("w9", REFUSED)],
}
CHAT_PROBES = COMMON_PROBES | {
    "messages": [([{"role": "user", "content": PROMPT}], unchanged),
                 ([{"role": "user", "content": 5}], REFUSED)],
    "max_completion_tokens": [(1, one_token), (0, REFUSED)],
    "logprobs": [(True, has_logprobs), (3, REFUSED)],
    "top_logprobs": [(2, REFUSED)],  # without logprobs: true (with it: checked below)
    "response_format": [({"type": "text"}, unchanged), ({"type": "json_object"}, REFUSED)],
    "tools": [([], unchanged), ([{"type": "function", "function": {"name": "f"}}], REFUSED)],
    "tool_choice": [("none", unchanged), ("auto", REFUSED)],
    "functions": [([], unchanged), ([{"name": "f"}], REFUSED)],
    "function_call": [("none", unchanged), ("auto", REFUSED)],
    "parallel_tool_calls": [(False, unchanged), ("no", REFUSED)],
    "audio": [({"voice": "alloy", "format": "wav"}, REFUSED)],
    "modalities": [(["text"], unchanged), (["text", "audio"], REFUSED)],
    "prediction": [({"type": "content", "content": "w1"}, REFUSED)],
    "reasoning_effort": [("low", REFUSED)],
    "verbosity": [("low", REFUSED)],
    "web_search_options": [({}, REFUSED)],
    "moderation": [({"model": "omni-moderation-latest"}, REFUSED)],
    "prompt_cache_options": [({"mode": "implicit"}, REFUSED)],
    "prompt_cache_retention": [("24h", REFUSED)],
    "prompt_cache_key": [("k", unchanged), (1, REFUSED)],
    "safety_identifier": [("s", unchanged), (1, REFUSED)],
    "metadata": [({"team": "a"}, unchanged), ({"team": 1}, REFUSED)],
    "store": [(False, unchanged), (True, REFUSED)],
    "service_tier": [("auto", unchanged), ("flex", REFUSED)],
}


def probe_body(base: dict, field: str, value, expect) -> dict:
    body = {**base, field: value}
    if field == "top_p":
        body["temperature"] = 1.0
    if field == "max_completion_tokens":
        del body["max_tokens"]  # both given and different is refused (as max_tokens)
    if field == "stream_options":
        body["stream"] = True
    if expect == STREAM:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if expect == SEED:
        body["temperature"] = 1.5
    return body


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_every_openai_request_field_is_honoured_or_refused_by_name(served, chat):
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    probes = CHAT_PROBES if chat else COMPLETION_PROBES
    params = (chat_params if chat else completion_create_params).CompletionCreateParamsStreaming
    fields = set(params.__required_keys__ | params.__optional_keys__)
    assert fields <= set(probes), f"OpenAI fields to decide on: {sorted(fields - set(probes))}"
    path = "/chat/completions" if chat else "/completions"
    base = {"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT}
    base |= {"model": "tiny", "max_tokens": 6, "temperature": 0}
    status, baseline = post(served, path, base)
    assert status == 200 and text_of(baseline)
    for field, cases in probes.items():
        for value, expect in cases:
            value = value(baseline) if callable(value) else value
            body = probe_body(base, field, value, expect)
            status, reply = post(served, path, body)
            where = (field, value, reply)
            if expect == REFUSED:
                assert status == 400, where
                assert reply["error"]["param"].split(".")[0] == field, where
            elif isinstance(expect, int):
                assert status == expect, where
            elif expect == STREAM:
                assert status == 200 and reply[-1] == "[DONE]", where
                assert reply[-2]["choices"] == [] and reply[-2]["usage"], where
            elif expect == SEED:
                again = post(served, path, body)[1]
                assert status == 200 and again["choices"] == reply["choices"], where
            else:
                assert status == 200 and expect(reply, baseline), where
    if chat:
        status, reply = post(served, path, {**base, "logprobs": True, "top_logprobs": 2})
        assert status == 200 and all(
            len(t["top_logprobs"]) == 2 for t in reply["choices"][0]["logprobs"]["content"])
    status, reply = post(served, path, {**base, "frobnicate": 1})
    assert status == 400 and reply["error"]["param"] == "frobnicate"


# -- a real evaluation client ----------------------------------------------------------------------

MC_DOCS = [{"question": "w5 w17 w3", "choices": ["w40", "w8", "w60 w61"], "answer": 0},
           {"question": "w1 w2", "choices": ["w3 w4", "w90", "w12"], "answer": 2},
           {"question": "w70", "choices": ["w71", "w72 w73 w74"], "answer": 1}]
LOCAL_DATA = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""  # a task's documents: the JSONL file it is formatted with
MC_TASK = "task: distillspec_tiny_mc\n" + LOCAL_DATA + """output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


def harness(tmp_path, monkeypatch, tasks, model: str, model_args: dict, **fields) -> dict:
    """lm-eval's ``simple_evaluate`` offline (nothing from the hub, nothing written to the
    user's HF cache) on tasks from local files: ``tasks`` is a list of (YAML template, its
    documents); ``{data}``, ``{cache}`` and ``fields`` fill the template."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    evaluator = pytest.importorskip(  # heavy, so not in [test]: see docs/serve.md
        "lm_eval.evaluator", reason="pip install 'distillspec[eval-harness]'")
    from lm_eval.tasks import TaskManager

    names = []
    for template, docs in tasks:
        name = template.split("\n", 1)[0].removeprefix("task: ")
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (tmp_path / f"{name}.yaml").write_text(
            template.format(data=data, cache=tmp_path / "cache", **fields))
        names.append(name)
    return evaluator.simple_evaluate(
        model=model, model_args=model_args, tasks=names,
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True, batch_size=2)


def through_server(served) -> dict:
    """lm-eval's ``local-completions`` model on the served tiny model, its tokenizer from the
    tiny model's folder (lm-eval sends token ids)."""
    return {"model": "tiny", "base_url": served["url"] + "/completions",
            "tokenizer": str(served["folder"]), "tokenizer_backend": "huggingface",
            "max_length": 256, "num_concurrent": 1, "max_retries": 1}


def samples_of(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


def test_lm_evaluation_harness_scores_a_multiple_choice_task_through_the_server(
        served, tmp_path, monkeypatch):
    """lm-eval's ``local-completions`` model, a task from local files, the tokenizer from the
    tiny model's folder; its log-likelihoods equal the target's own."""
    results = harness(tmp_path, monkeypatch, [(MC_TASK, MC_DOCS)], "local-completions",
                      through_server(served))
    samples = samples_of(results, "distillspec_tiny_mc")
    correct = []
    for doc, sample in zip(MC_DOCS, samples):
        context = ids_of(served, doc["question"])
        expected = []
        for choice in doc["choices"]:
            full = ids_of(served, f"{doc['question']} {choice}")
            reference = reference_logprobs(served["target"], full)
            expected.append(sum(float(reference[t - 1, full[t]]) for t in range(len(context),
                                                                                  len(full))))
        got = [float(resp[0][0]) for resp in sample["resps"]]
        assert got == pytest.approx(expected, abs=1e-3)
        correct.append(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    accuracy = results["results"]["distillspec_tiny_mc"]["acc,none"]
    assert accuracy == pytest.approx(sum(correct) / len(correct))


GEN_TASK = "task: distillspec_tiny_gen\n" + LOCAL_DATA + """output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["{stop}"]
  max_gen_toks: {steps}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""
GEN_PROMPTS = ["w5 w17 w3", "w1 w2", "w70", "w9 w33 w12 w4", "w60 w61", "w88 w20"]
GEN_STEPS = 8


def greedy_text(served, prompt: str, steps: int) -> str:
    """The target's own greedy continuation of ``prompt`` tokenized as lm-eval does (no special
    tokens added): a full forward per token, no cache, no draft; its text up to the eos."""
    ids, out = served["tokenizer"](prompt, add_special_tokens=False)["input_ids"], []
    with torch.no_grad():
        for _ in range(steps):
            token = int(served["target"](torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == served["tokenizer"].eos_token_id:
                break
            out.append(token)
    return served["tokenizer"].decode(out, skip_special_tokens=True)


def generation_docs(served) -> tuple[list[dict], str, list[str]]:
    """(documents, a stop string, the expected answers): the stop string is the third word of
    a greedy continuation (so it cuts at least one), every other document's answer is right."""
    uncut = [greedy_text(served, prompt, GEN_STEPS) for prompt in GEN_PROMPTS]
    words = next((text.split() for text in uncut if len(text.split()) >= 4), None)
    assert words, "every greedy continuation ends within 3 words: pick other prompts"
    stop = " " + words[2]
    expected = [text.split(stop)[0] for text in uncut]
    assert expected != uncut
    docs = [{"question": prompt, "answer": answer if i % 2 == 0 else "none"}
            for i, (prompt, answer) in enumerate(zip(GEN_PROMPTS, expected))]
    return docs, stop, expected


def test_lm_evaluation_harness_generates_until_a_stop_string_through_the_server(
        served, tmp_path, monkeypatch):
    """A generate_until task (greedy, a stop string, max_gen_toks) through SD: each answer is
    the target's own greedy continuation cut before the stop string, and exact match counts
    the right ones."""
    docs, stop, expected = generation_docs(served)
    results = harness(tmp_path, monkeypatch, [(GEN_TASK, docs)], "local-completions",
                      through_server(served), stop=stop, steps=GEN_STEPS)
    samples = samples_of(results, "distillspec_tiny_gen")
    assert [sample["filtered_resps"][0] for sample in samples] == expected
    right = sum(doc["answer"] == answer for doc, answer in zip(docs, expected))
    assert results["results"]["distillspec_tiny_gen"]["exact_match,none"] == pytest.approx(
        right / len(docs))


@pytest.mark.slow
def test_lm_evaluation_harness_hf_model_and_the_server_agree(served, tmp_path, monkeypatch):
    """The same two tasks through lm-eval's ``hf`` model (transformers on the same folder,
    float32) and through the server with SD: equal log-likelihoods, identical generations."""
    docs, stop, expected = generation_docs(served)
    tasks = [(MC_TASK, MC_DOCS), (GEN_TASK, docs)]
    ours = harness(tmp_path, monkeypatch, tasks, "local-completions", through_server(served),
                   stop=stop, steps=GEN_STEPS)
    theirs = harness(tmp_path, monkeypatch, tasks, "hf", {
        "pretrained": str(served["folder"]), "dtype": "float32", "device": "cpu",
        "max_length": 256}, stop=stop, steps=GEN_STEPS)
    for a, b in zip(samples_of(ours, "distillspec_tiny_mc"),
                    samples_of(theirs, "distillspec_tiny_mc"), strict=True):
        assert [float(r[0][0]) for r in a["resps"]] == pytest.approx(
            [float(r[0][0]) for r in b["resps"]], abs=TOL)
    texts = [[sample["filtered_resps"][0] for sample in samples_of(run, "distillspec_tiny_gen")]
             for run in (ours, theirs)]
    assert texts[0] == texts[1] == expected
    for task, metric in (("distillspec_tiny_mc", "acc,none"), ("distillspec_tiny_gen",
                                                               "exact_match,none")):
        assert ours["results"][task][metric] == theirs["results"][task][metric]

"""The OpenAI request fields of ``distillspec serve``: each one honoured or refused, none ignored.

``parse_request`` walks a body against its endpoint's field table: a field the server honours is
checked and used; a field it cannot honour is accepted only at the value that means "off" (for
example ``frequency_penalty: 0``, ``tools: []``, ``response_format: {"type": "text"}``) and
otherwise refused with a 400 naming it; identifiers that never change the output (``user``,
``metadata``, ...) are accepted; anything else is refused as unrecognised. ``request_schema``
publishes the same table as JSON schema (``/openapi.json``). The response side lives here too:
each token's text and offset (``TokenTexts``) and the OpenAI log-probability formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distillspec.decoding.params import MAX_TEMPERATURE, MAX_TOP_K, SamplingConfig, check_seed
from distillspec.decoding.requests import TokenLogprobs

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # per stop string
MAX_MESSAGES = 256
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: 5 for completions, 20 for chat)
MAX_METADATA = 16
LOWEST_LOGPROB = -9999.0  # what a -inf log-probability is reported as (JSON has no -inf)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_KEYS_REFUSED = ("tool_calls", "tool_call_id", "function_call", "audio", "refusal")

# Fields this server cannot honour: accepted only at null or these "off" values.
NOT_SUPPORTED = "is not supported by this server"
DEFAULT_ONLY: dict[str, tuple[tuple, str]] = {
    "frequency_penalty": ((0,), "penalties are not supported (speculative acceptance would "
                          "need the penalised target distribution); send 0 or omit it"),
    "presence_penalty": ((0,), "penalties are not supported (speculative acceptance would "
                         "need the penalised target distribution); send 0 or omit it"),
    "logit_bias": (({},), f"logit_bias {NOT_SUPPORTED}; send {{}} or omit it"),
    "suffix": (("",), f"suffix (text insertion) {NOT_SUPPORTED}"),
    "response_format": (({"type": "text"},), 'only response_format {"type": "text"} is '
                        "supported (no JSON mode or JSON schema)"),
    "tools": (([],), f"tool calling {NOT_SUPPORTED}"),
    "tool_choice": (("none",), f"tool calling {NOT_SUPPORTED}"),
    "functions": (([],), f"function calling {NOT_SUPPORTED}"),
    "function_call": (("none",), f"function calling {NOT_SUPPORTED}"),
    "audio": ((), f"audio output {NOT_SUPPORTED}"),
    "modalities": ((["text"],), 'only modalities ["text"] are supported'),
    "prediction": ((), f"predicted outputs {NOT_SUPPORTED}"),
    "reasoning_effort": ((), f"reasoning_effort {NOT_SUPPORTED} (not a reasoning model)"),
    "verbosity": ((), f"verbosity {NOT_SUPPORTED}"),
    "web_search_options": ((), f"web search {NOT_SUPPORTED}"),
    "moderation": ((), f"moderation {NOT_SUPPORTED}"),
    "prompt_cache_options": ((), f"prompt_cache_options {NOT_SUPPORTED}"),
    "prompt_cache_retention": ((), f"prompt_cache_retention {NOT_SUPPORTED}"),
    "store": ((False,), f"stored completions are {NOT_SUPPORTED.removeprefix('is ')}"),
    "service_tier": (("auto", "default"), "this server has one service tier: auto or default"),
}
# Accepted, and without any effect on the output (identifiers, routing hints).
IDENTIFIERS = {"user": {"type": "string"}, "safety_identifier": {"type": "string"},
               "prompt_cache_key": {"type": "string"}, "parallel_tool_calls": {"type": "boolean"},
               "metadata": {"type": "object", "properties": {}, "maxProperties": MAX_METADATA}}
HONOURED = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
            "stop", "seed", "stream", "stream_options"}
COMPLETION_FIELDS = HONOURED | {"prompt", "echo", "logprobs", "best_of", "suffix", "user",
                                "frequency_penalty", "presence_penalty", "logit_bias"}
CHAT_FIELDS = HONOURED | set(DEFAULT_ONLY) - {"suffix"} | set(IDENTIFIERS) | {
    "messages", "logprobs", "top_logprobs"}


class APIError(Exception):
    """An OpenAI-style error: status, message, type, param."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


@dataclass
class ApiRequest:
    """A request body, checked: what the engine and the response need."""

    prompts: list[str | list[int]]  # completions: one entry per prompt (text or token ids)
    messages: list[dict] | None  # chat: {role, content: str, other string keys}
    max_tokens: int | None  # None: the server's default for each prompt
    sampling: SamplingConfig
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    n: int
    logprobs: int | None  # alternatives per token; None: no log-probabilities
    echo: bool


def parse_request(body: dict, chat: bool, vocab: int) -> ApiRequest:
    """Check every field of ``body`` (a JSON object); raises APIError(400, param=field)."""
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name, value in body.items():
        if name not in allowed:
            raise _bad(name, f"Unrecognized request argument supplied: {name}. This server "
                       f"accepts {', '.join(sorted(allowed))} on this endpoint.")
        if name in DEFAULT_ONLY and value is not None:
            _default_only(name, value)
        elif name in IDENTIFIERS and value is not None:
            _identifier(name, value)
    n = _integer(body, "n", 1, 1, MAX_N)
    best_of = body.get("best_of")
    if best_of is not None and not (_is_int(best_of) and best_of == n):
        raise _bad("best_of", f"best_of must equal n ({n}): choosing the best of more "
                   f"completions {NOT_SUPPORTED}; got {best_of!r}.")
    logprobs, echo = _logprobs(body, chat)
    stream, include_usage = _stream(body)
    prompts = [] if chat else _prompts(body, vocab)
    if len(prompts or [None]) * n > MAX_CHOICES:
        raise _bad("n", f"prompts x n must be at most {MAX_CHOICES}; got "
                   f"{len(prompts)} x {n}.")
    temperature = _number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise _bad("top_p", "top_p must be > 0.")
    top_k = max(_integer(body, "top_k", 0, -1, MAX_TOP_K), 0)  # -1 or 0: off (vLLM's -1)
    return ApiRequest(
        prompts=prompts, messages=_messages(body) if chat else None,
        max_tokens=_max_tokens(body, echo), n=n, stop=_stop(body), seed=_seed(body),
        sampling=SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k),
        stream=stream, include_usage=include_usage, logprobs=logprobs, echo=echo)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice ``choice`` of a prompt: the request's own for choice 0 (so n=1 is
    unchanged), then distinct seeds derived from it (reproducible, within torch's range)."""
    if seed is None or choice == 0:
        return seed
    return (seed + choice * 0x9E3779B97F4A7C15) % (1 << 64)


# -- single fields -------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(value, accepted) -> bool:
    """JSON equality: 0 == 0.0, but False is not 0."""
    if _is_number(value) and _is_number(accepted):
        return value == accepted
    return type(value) is type(accepted) and value == accepted


def _default_only(name: str, value) -> None:
    accepted, why = DEFAULT_ONLY[name]
    if not any(_same(value, option) for option in accepted):
        raise _bad(name, f"{name}={value!r}: {why}.")


def _identifier(name: str, value) -> None:
    kind = IDENTIFIERS[name]["type"]
    if kind == "string" and not isinstance(value, str) or kind == "boolean" and not isinstance(
            value, bool):
        raise _bad(name, f"{name} must be a {kind}, got {value!r}.")
    if kind == "object" and not (isinstance(value, dict) and len(value) <= MAX_METADATA and all(
            isinstance(v, str) for v in value.values())):
        raise _bad(name, f"{name} must be an object of at most {MAX_METADATA} string values.")


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise _bad(name, f"{name} must be a number, got {value!r}.")
    if not low <= value <= high:
        raise _bad(name, f"{name} must be between {low} and {high}, got {value}.")
    return float(value)


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise _bad(name, f"{name} must be an integer in [{low}, {high}], got {value!r}.")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false, got {value!r}.")
    return bool(value)


def _max_tokens(body: dict, echo: bool) -> int | None:
    given = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise _bad("max_tokens", "max_tokens and max_completion_tokens disagree; send one.")
    if not given:
        return None
    name, value = next(iter(given.items()))
    low = 0 if echo else 1
    if not _is_int(value) or value < low:
        raise _bad(name, f"{name} must be an integer >= {low}"
                   f"{'' if echo else ' (0 only with echo)'}, got {value!r}.")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(
            stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"stop must be a string or up to {MAX_STOP_STRINGS} strings.")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise _bad("stop", f"each stop string must be at most {MAX_STOP_CHARS} characters.")
    return stop


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    try:
        check_seed(seed)
    except ValueError as error:
        raise _bad("seed", str(error)) from None
    return seed


def _stream(body: dict) -> tuple[bool, bool]:
    stream, options = _flag(body, "stream"), body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true.")
    if not isinstance(options, dict):
        raise _bad("stream_options", "stream_options must be an object.")
    for key, value in options.items():
        if key not in ("include_usage", "include_obfuscation") or not isinstance(value, bool):
            raise _bad("stream_options", f"stream_options.{key}={value!r}: only the booleans "
                       "include_usage and include_obfuscation are recognised.")
        if key == "include_obfuscation" and value:
            raise _bad("stream_options", f"stream_options.include_obfuscation {NOT_SUPPORTED}.")
    return stream, bool(options.get("include_usage"))


def _logprobs(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(alternatives per token or None, echo). Chat: logprobs is a flag and top_logprobs the
    count; completions: logprobs is the count."""
    if not chat:
        return (None if body.get("logprobs") is None else
                _integer(body, "logprobs", 0, 0, MAX_LOGPROBS)), _flag(body, "echo")
    wanted = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    if body.get("top_logprobs") is not None and not wanted:
        raise _bad("top_logprobs", "top_logprobs needs logprobs: true.")
    return (top if wanted else None), False


def _prompts(body: dict, vocab: int) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or isinstance(prompt, list) and prompt and all(
            _is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or all(
            isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)):
        prompts = prompt
    else:
        raise _bad("prompt", "prompt must be a non-empty string, a list of token ids, or a list "
                   "of either.")
    if len(prompts) > MAX_CHOICES:
        raise _bad("prompt", f"At most {MAX_CHOICES} prompts per request, got {len(prompts)}.")
    for item in prompts:
        if isinstance(item, str) and not item:
            raise _bad("prompt", "Every prompt must be non-empty.")
        if isinstance(item, list) and not all(0 <= t < vocab for t in item):
            raise _bad("prompt", f"Token ids must be in [0, {vocab}) for this model.")
    return prompts


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES or not all(
            isinstance(m, dict) for m in messages):
        raise _bad("messages", f"messages must be a list of 1 to {MAX_MESSAGES} "
                   "{role, content} objects.")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: dict, i: int) -> dict:
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"messages.[{i}].role", f"messages[{i}].role must be one of "
                   f"{', '.join(ROLES)} (tool and function messages need tool calling, which "
                   f"{NOT_SUPPORTED}); got {role!r}.")
    for key, value in message.items():
        if key in MESSAGE_KEYS_REFUSED:
            raise _bad(f"messages.[{i}].{key}", f"messages[{i}].{key} {NOT_SUPPORTED}.")
        if key not in ("role", "content") and not isinstance(value, str):
            raise _bad(f"messages.[{i}].{key}", f"messages[{i}].{key} must be a string.")
    return {**message, "role": ROLES[role], "content": _content(message.get("content"), i)}


def _content(content, i: int) -> str:
    """A string, or the text parts of a list joined with newlines (as vLLM does)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"messages.[{i}].content", f"messages[{i}].content must be a string or a "
                   "list of text parts.")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise _bad(f"messages.[{i}].content.[{j}].type", f"messages[{i}].content[{j}]: only "
                       f"{{type: text, text}} parts are supported, got type {kind!r}.")
        texts.append(part["text"])
    return "\n".join(texts)


# -- the published schema -------------------------------------------------------------------------


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def request_schema(chat: bool, context: int, vocab: int) -> dict:
    """The JSON schema of the request body this server accepts (in /openapi.json; the fuzz
    test draws requests from it). Fields outside it are refused."""
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                       "maximum": vocab - 1}}
    stop = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    properties = {
        "model": {"type": "string"},
        "max_tokens": _nullable({"type": "integer", "minimum": 0 if not chat else 1,
                                 "maximum": context}),
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1,
                                            "maximum": context}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _nullable({"type": "integer", "minimum": -1, "maximum": vocab}),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_N}),
        "stop": _nullable({"anyOf": [stop, {"type": "array", "maxItems": MAX_STOP_STRINGS,
                                            "items": stop}]}),
        "seed": _nullable({"type": "integer", "minimum": -(1 << 63), "maximum": (1 << 64) - 1}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({"type": "object", "properties": {
            "include_usage": {"type": "boolean"}, "include_obfuscation": {"const": False}}}),
    }
    for name, (accepted, _) in DEFAULT_ONLY.items():
        properties[name] = {"anyOf": [{"const": v} for v in accepted] + [{"type": "null"}]}
    properties |= {name: _nullable(schema) for name, schema in IDENTIFIERS.items()}
    if chat:
        part = {"type": "object", "required": ["type", "text"], "properties": {
            "type": {"const": "text"}, "text": {"type": "string"}}}
        message = {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string", "enum": list(ROLES)},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]},
            "name": {"type": "string"}}}
        properties |= {"messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES,
                                    "items": message},
                       "logprobs": _nullable({"type": "boolean"}),
                       "top_logprobs": _nullable({"type": "integer", "minimum": 0,
                                                  "maximum": MAX_LOGPROBS})}
    else:
        text = {"type": "string", "minLength": 1}
        properties |= {
            "prompt": {"anyOf": [text, ids, {"type": "array", "minItems": 1,
                                              "maxItems": MAX_CHOICES, "items": text},
                                 {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES,
                                  "items": ids}]},
            "echo": _nullable({"type": "boolean"}),
            "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}),
            "best_of": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_N})}
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    return {"type": "object", "required": ["messages" if chat else "prompt"],
            "additionalProperties": False,
            "properties": {k: v for k, v in properties.items() if k in allowed}}


# -- tokens in responses -------------------------------------------------------------------------


@dataclass
class TokenOut:
    """One token as a response shows it: its text, where that text starts in the prompt
    followed by the answer (OpenAI's ``text_offset``, echo or not), its log-probability (None
    for an echoed first prompt token) and the alternatives'."""

    text: str
    offset: int
    logprob: float | None
    top: list[tuple[str, float]] | None


class TokenTexts:
    """Each token's text: what it adds to the decoded text (special tokens add nothing; a token
    that ends inside a character adds nothing and the next one adds the whole character). The
    window of ids decoded stays a few tokens long, as in vLLM's incremental detokenizer."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.offset = offset  # where the next token's text starts

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int, entry: TokenLogprobs | None) -> TokenOut:
        before = self._decode(self.ids[self.prefix : self.read])
        top = None if entry is None else [
            (self._decode(self.ids[self.prefix :] + [alt])[len(before) :], _finite(lp))
            for alt, lp in entry.top]
        self.ids.append(token)
        text, offset = self._decode(self.ids[self.prefix :]), self.offset
        if len(text) <= len(before) or text.endswith("\ufffd"):
            text = ""
        else:
            text = text[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.offset += len(text)
        return TokenOut(text, offset, None if entry is None else _finite(entry.logprob), top)

    def extend(self, tokens: list[int], entries: list) -> list[TokenOut]:
        return [self.add(token, entry) for token, entry in zip(tokens, entries)]


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


def completion_logprobs(tokens: list[TokenOut]) -> dict:
    """The completions format: parallel lists; ``top_logprobs`` maps text to log-probability
    (the most likely alternatives, then the taken token: up to logprobs + 1 entries)."""
    tops = []
    for token in tokens:
        if token.top is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for text, logprob in token.top:
            top.setdefault(text, logprob)
        top.setdefault(token.text, token.logprob)
        tops.append(top)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": [t.offset for t in tokens]}


def chat_logprobs(tokens: list[TokenOut]) -> dict:
    """The chat format: one object per token, with its UTF-8 bytes and top alternatives."""
    return {"content": [
        {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                          for s, lp in t.top or []]}
        for t in tokens], "refusal": None}


def choice_json(index: int, text: str, finish: str | None, tokens: list[TokenOut] | None,
                chat: bool, delta: bool) -> dict:
    """One choice of a response (``delta``: of a stream chunk) in OpenAI's format."""
    logprobs = None if tokens is None else (chat_logprobs if chat else completion_logprobs)(tokens)
    if not chat:
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
    if delta:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish}

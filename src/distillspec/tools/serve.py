"""``distillspec serve``: an OpenAI-compatible server on speculative decoding.

Starlette/FastAPI on uvicorn (the standard ASGI pair: FastAPI for routing and error handlers,
uvicorn for HTTP/1.1 + server-sent events). Endpoints: ``POST /v1/completions``,
``POST /v1/chat/completions`` (chat template applied), ``stream: true`` as SSE chunks in
OpenAI's format, ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus). Requests
join the running batch between speculative steps (``serve_engine.EngineWorker``); a greedy
request returns exactly the target's greedy output whatever else is in the batch. Errors are
OpenAI-style JSON with a 4xx status. Binds to 127.0.0.1 unless told otherwise; ``--api-key``
requires a bearer token.

Which OpenAI fields are honoured and which refused, and the response formats of tokens and
log-probabilities, live in ``serve_api``; the decoding worker in ``serve_engine``, OSD in ``osd``.
This module turns a checked request into engine requests (prompts x n choices) and streams
their text back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import NoReturn

from distillspec.decoding.mode_policy import ModePolicy, arm_name, bucket
from distillspec.decoding.packed_linear import warm_choices
from distillspec.models.quantize import draft_quantization
from distillspec.tools.configs import ServeConfig
from distillspec.tools.serve_api import (
    APIError,
    ApiRequest,
    TokenOut,
    TokenTexts,
    choice_json,
    choice_seed,
    parse_request,
    request_schema,
)
from distillspec.tools.serve_engine import (
    STOP_SECONDS,
    Busy,
    EngineDead,
    EngineWorker,
    Job,
    RowFailure,
)

try:  # module level: FastAPI resolves the handlers' annotations in this module's namespace
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
except ImportError as missing:  # pragma: no cover - the [serve] extra is not installed
    raise ValueError(
        "distillspec serve needs FastAPI and uvicorn: pip install 'distillspec[serve]'."
    ) from missing

TEXT_CHARS_PER_TOKEN = 64  # prompt text beyond context x this is refused before tokenizing


class ServeMetrics:
    """Prometheus metrics in vLLM's naming spirit, in the server's own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("distillspec_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.ttft = Histogram("distillspec_time_to_first_token_seconds", "Time to first token",
                              registry=registry, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tpot = Histogram("distillspec_time_per_output_token_seconds", "Time per output token",
                              registry=registry, buckets=(.005, .01, .02, .04, .08, .16, .32, .64, 1.28))
        self.e2e = Histogram("distillspec_request_latency_seconds", "End-to-end latency",
                             registry=registry, buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.running = Gauge("distillspec_num_requests_running", "Requests being decoded",
                             registry=registry)
        self.waiting = Gauge("distillspec_num_requests_waiting", "Requests queued",
                             registry=registry)
        self.drafted = Counter("distillspec_spec_decode_num_draft_tokens", "Draft tokens proposed",
                               registry=registry)
        self.accepted = Counter("distillspec_spec_decode_num_accepted_tokens",
                                "Draft tokens accepted", registry=registry)
        self.emitted = Counter("distillspec_spec_decode_num_emitted_tokens", "Tokens emitted",
                               registry=registry)
        self.position_drafted = Counter("distillspec_spec_decode_position_drafted",
                                        "Blocks that drafted position i", ["position"],
                                        registry=registry)
        self.position_accepted = Counter("distillspec_spec_decode_position_accepted",
                                         "Blocks that accepted position i", ["position"],
                                         registry=registry)
        self.draft_version = Gauge("distillspec_draft_version", "Version of the served draft",
                                   registry=registry)
        self.draft_alpha = Gauge("distillspec_draft_alpha", "Held-back alpha of the served draft",
                                 registry=registry)
        self.swaps = Counter("distillspec_draft_swaps", "Drafts replaced by online distillation",
                             registry=registry)
        self.steps = Counter("distillspec_spec_decode_steps",
                             "Engine steps by mode: speculate (as configured), gamma1 (a 1-token "
                             "chain) or plain (no draft token; --sd-policy auto picks per step), "
                             "or lookup (a prompt lookup block, --lookup)",
                             ["mode"], registry=registry)
        self.mode_rate = Gauge("distillspec_spec_decode_mode_tokens_per_second_per_row",
                               "Measured tokens/s per running row of each mode per batch-size "
                               "bucket (decayed tokens per row over decayed seconds; "
                               "--sd-policy auto chooses by it plus one standard error, each "
                               "scaled by plain's step time at the batch size it ran at)",
                               ["batch_bucket", "mode"], registry=registry)
        self.plain_from = Gauge("distillspec_spec_decode_plain_from_batch",
                                "--sd-policy auto: the batch size from which every step decodes "
                                "plain, every drafting mode having measured far slower per row "
                                "there (re-measured 1 step in 256); 0: none", registry=registry)

    def describe(self, draft_spec: str, speculation, sd_policy: str,
                 draft_weights: str = "none", sd_margin: float | None = None) -> None:
        """``distillspec_speculation_info``: the draft and the setting this server runs
        (``sd_margin``: the auto policy's margin; empty where no policy chooses)."""
        from prometheus_client import Info

        info = Info("distillspec_speculation", "The served draft and speculation setting",
                    registry=self.registry)
        info.info({"draft": draft_spec, "gamma": str(speculation.gamma),
                   "confidence_threshold": f"{speculation.confidence_threshold:g}",
                   "tree": speculation.tree, "lookup": str(speculation.lookup),
                   "sd_policy": sd_policy,
                   "sd_margin": "" if sd_margin is None else f"{sd_margin:g}",
                   "draft_weights": draft_weights})

    def record_rate(self, batch: int, arm, policy) -> None:
        """The policy just measured ``arm`` at ``batch`` rows: its gauge, and no other, moves."""
        rate = policy.rate(batch, arm)
        if rate is not None:
            self.mode_rate.labels(str(bucket(batch)), arm_name(arm)).set(rate)
        self.plain_from.set(policy.plain_from())

    def reset_rates(self, policy) -> None:
        """After a draft swap: the gauges show what the policy still holds (plain's rates)."""
        self.mode_rate.clear()
        for (size, name), rate in policy.estimates().items():
            self.mode_rate.labels(str(size), name).set(rate)
        self.plain_from.set(policy.plain_from())

    def record_step(self, update) -> None:
        self.emitted.inc(len(update.new_tokens))
        if update.drafted:
            self.drafted.inc(update.drafted)
            self.accepted.inc(update.accepted)
            for position in range(update.drafted):
                self.position_drafted.labels(str(position)).inc()
                if position < update.accepted:
                    self.position_accepted.labels(str(position)).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# -- stop strings --------------------------------------------------------------------------------


def stop_cut(text: str, stops: list[str]) -> int | None:
    """Where the text ends: the start of the first stop string in it, or None."""
    found = [text.find(stop) for stop in stops if stop in text]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` must wait: the longest end of it that is the
    start of a stop string (the next tokens may complete that stop string)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def _body_doc(chat: bool, context: int, vocab: int) -> dict:
    schema = request_schema(chat, context, vocab)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# -- choices and their text ----------------------------------------------------------------------


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what echo returns: the prompt as sent (token ids: decoded)


@dataclass
class Choice:
    """One sequence a request asked for (a prompt, one of its n), decoding in the engine."""

    index: int
    prompt: Prompt
    request_id: int
    job: Job
    done: bool = False  # finished, failed or stopped: nothing left to cancel


@dataclass
class Piece:
    """What ``Server.stream_text`` yields: new text, the finish reason once finished, the
    tokens decoded so far, and with logprobs the tokens that go with this text."""

    text: str
    finish: str | None
    count: int
    tokens: list[TokenOut] | None = None


def _release(waiting: list[TokenOut], limit: float, texts, stop: bool = False):
    """Take from ``waiting`` the tokens whose text ends by ``limit`` (``stop``: starts before
    it); None when the request asked for no log-probabilities."""
    if texts is None:
        return None
    count = 0
    for token in waiting:
        if not (token.offset < limit if stop else token.offset + len(token.text) <= limit):
            break
        count += 1
    taken = waiting[:count]
    del waiting[:count]
    return taken


# -- the app -------------------------------------------------------------------------------------


class Server:
    """The models, the engine and the optional online distiller behind the HTTP routes."""

    def __init__(self, config: ServeConfig, target, draft, tokenizer, draft_spec: str):
        from distillspec.models.loading import eos_token_ids

        self.config, self.tokenizer = config, tokenizer
        self.model_id = config.model_name or config.target
        self.metrics = ServeMetrics()
        self.stop_ids = frozenset(eos_token_ids(target, tokenizer))
        self.context = getattr(target.config, "max_position_embeddings", 2048)
        self.vocab = target.get_input_embeddings().num_embeddings  # prompt ids must be below
        self.distiller = None
        if config.online_distill:
            from distillspec.tools.osd import OnlineDistiller

            self.distiller = OnlineDistiller(config, draft_spec, tokenizer, self)
        speculation = config.speculation
        if draft is not None:
            from distillspec.tools.generate import speculation_for

            speculation = speculation_for(speculation, draft_spec, config.target, target,
                                          config.measured_setting)
        self.on_dead = None  # set by whoever runs the HTTP server: stop it (the engine died)
        choosing = draft is not None and config.sd_policy == "auto"
        self.metrics.describe(draft_spec if draft is not None else "none", speculation,
                              config.sd_policy, draft_quantization(draft),
                              config.sd_margin if choosing else None)
        policy = None
        if choosing:
            policy = ModePolicy.for_speculation(speculation.gamma,
                                                speculation.tree_shape is not None,
                                                margin=config.sd_margin)
        started = time.perf_counter()
        # A float32 kernel choice first timed mid-request costs up to ~0.4 s in that step, and
        # speculative steps reach wider calls than plain ones: time them all before serving.
        self.warmed_choices = sum(warm_choices(m) for m in (target, draft) if m is not None)
        self.warmup = (f"{self.warmed_choices} kernel choices timed in "
                       f"{time.perf_counter() - started:.1f} s")
        self.engine = EngineWorker(
            target, draft, speculation, max_batch=config.max_batch,
            max_waiting=config.max_waiting, metrics=self.metrics,
            on_finished=self.distiller.record if self.distiller else None,
            on_dead=lambda: self.on_dead and self.on_dead(), policy=policy,
        )

    def check_auth(self, request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.config.api_key}":
            raise APIError(401, "Invalid or missing API key (Authorization: Bearer KEY).",
                           kind="authentication_error", code="invalid_api_key")

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model not in (None, self.model_id):
            raise APIError(404, f"The model {model!r} does not exist; this server serves "
                           f"{self.model_id!r}.", param="model", code="model_not_found")

    def encode(self, request: ApiRequest) -> list[Prompt]:
        """The request's prompts as token ids (chat: the template applied to the messages)."""
        if request.messages is not None:
            messages = request.messages
            self._check_length(sum(len(m["content"]) for m in messages), "messages")
            if self.config.chat_template and getattr(self.tokenizer, "chat_template", None):
                text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
                return [Prompt(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]),
                               text)]
            text = "\n".join(m["content"] for m in messages)
            return [Prompt(list(self.tokenizer(text)["input_ids"]), text)]
        prompts = []
        for prompt in request.prompts:
            if isinstance(prompt, list):  # token ids, checked against the vocabulary
                text = self.tokenizer.decode(prompt, skip_special_tokens=True)
                prompts.append(Prompt(list(prompt), text))
                continue
            self._check_length(len(prompt), "prompt")
            prompts.append(Prompt(list(self.tokenizer(prompt)["input_ids"]), prompt))
        return prompts

    def _check_length(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit the context before spending time tokenizing it."""
        if chars > self.context * TEXT_CHARS_PER_TOKEN:
            raise APIError(400, f"The {param} ({chars} characters) cannot fit the context of "
                           f"{self.context} tokens.", param=param, code="context_length_exceeded")

    async def start(self, body: dict, chat: bool) -> tuple[ApiRequest, list[Prompt], list[Choice]]:
        """Check the body and queue one engine request per choice (prompt-major, as OpenAI
        numbers them); if any cannot be queued, the others are cancelled."""
        self.check_model(body)
        request = parse_request(body, chat, self.vocab)
        prompts = self.encode(request)
        budgets = [self._budget(request, prompt) for prompt in prompts]
        if len(prompts) * request.n > self.config.max_waiting:
            raise APIError(400, f"{len(prompts)} prompts x n={request.n} is more than this "
                           f"server queues ({self.config.max_waiting}).", param="n")
        choices: list[Choice] = []
        try:
            for p, (prompt, budget) in enumerate(zip(prompts, budgets)):
                for j in range(request.n):
                    request_id, job = self._submit(request, prompt, budget, j)
                    choices.append(Choice(p * request.n + j, prompt, request_id, job))
        except BaseException:
            self.cancel(choices)
            raise
        return request, prompts, choices

    def _budget(self, request: ApiRequest, prompt: Prompt) -> int:
        budget = request.max_tokens
        if budget is None:
            budget = min(256, max(self.context - len(prompt.ids), 1))
        if len(prompt.ids) + budget > self.context:
            raise APIError(400, f"The prompt ({len(prompt.ids)} tokens) plus max_tokens "
                           f"({budget}) exceeds the context of {self.context} tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return budget

    def _submit(self, request: ApiRequest, prompt: Prompt, budget: int, choice: int):
        # echo with logprobs scores the prompt; so does echo with max_tokens 0 (nothing else
        # to do: the engine scores the prompt and stops)
        scoring = request.logprobs if request.echo else None
        if budget == 0 and scoring is None:
            scoring = 0
        try:
            return self.engine.submit(prompt.ids, budget, request.sampling, self.stop_ids,
                                      choice_seed(request.seed, choice),
                                      logprobs=request.logprobs, prompt_logprobs=scoring)
        except ValueError as error:
            raise APIError(400, str(error)) from None
        except Busy:
            raise APIError(503, f"The server is busy ({self.config.max_waiting} requests "
                           "waiting); retry later.", kind="server_error",
                           headers={"Retry-After": "1"}) from None
        except EngineDead as dead:
            raise APIError(503, f"The decoding engine is not running ({dead}); retry shortly.",
                           kind="server_error", headers={"Retry-After": "5"}) from None

    def cancel(self, choices: list[Choice]) -> None:
        for choice in choices:
            if not choice.done:
                self.engine.cancel(choice.request_id)

    async def pieces(self, request: ApiRequest, choices: list[Choice]):
        """Every choice's ``Piece``s as (choice, piece), in the order they come; the first
        failure raises. Closing it cancels the choices still decoding."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for piece in self.stream_text(choice, request):
                    queue.put_nowait((choice, piece))
            except APIError as error:
                queue.put_nowait((choice, error))
            except Exception as error:  # noqa: BLE001 - reported as this request's 500
                queue.put_nowait((choice, APIError(500, f"{type(error).__name__}: {error}",
                                                   kind="server_error")))
            finally:
                queue.put_nowait((choice, None))

        tasks = [asyncio.create_task(pump(choice)) for choice in choices]
        try:
            live = len(tasks)
            while live:
                choice, item = await queue.get()
                if isinstance(item, APIError):
                    raise item
                if item is None:
                    live -= 1
                else:
                    yield choice, item
        finally:
            for task in tasks:
                task.cancel()
            self.cancel(choices)

    async def stream_text(self, choice: Choice, request: ApiRequest):
        """Yields ``Piece``s as blocks are accepted (with echo, the prompt first).

        A stop string ends the text before it (and cancels the request); no part of it is ever
        sent. A stop string can span tokens and blocks, so the end of the text that could be the
        start of one is held back until the next tokens settle it (as vLLM does); a request that
        ends another way (eos, length) then sends what was held. With logprobs, a token goes
        with the piece that completes its text (at a stop string: every token whose text starts
        before it)."""
        tokens: list[int] = []
        sent, stops = "", request.stop
        try:
            if request.echo:
                yield await self._echo(choice, request)
            # text_offset counts from the prompt's start, echoed or not (OpenAI's convention)
            base = len(choice.prompt.text)
            texts = None if request.logprobs is None else TokenTexts(self.tokenizer, base)
            waiting: list[TokenOut] = []  # tokens whose text is not all sent yet
            while True:
                update = await self._next(choice)
                tokens += update.new_tokens
                if texts is not None and update.logprobs is not None:
                    waiting += texts.extend(update.new_tokens, update.logprobs)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = stop_cut(text, stops)
                if cut is not None:
                    choice.done = True
                    self.engine.cancel(choice.request_id)
                    yield Piece(text[len(sent):cut], "stop", len(tokens),
                                _release(waiting, base + cut, texts, stop=True))
                    return
                if update.finished:
                    choice.done = True
                    reason = {"eos": "stop", "length": "length"}.get(update.finish_reason, "stop")
                    yield Piece(text[len(sent):], reason, len(tokens),
                                _release(waiting, float("inf"), texts))
                    return
                if text.endswith("\ufffd"):  # wait for whole characters
                    continue
                ready = len(text) - held_back(text, stops)
                if ready > len(sent):
                    yield Piece(text[len(sent):ready], None, len(tokens),
                                _release(waiting, base + ready, texts))
                    sent = text[:ready]
        finally:
            self._observe(choice.job, len(tokens))

    async def _next(self, choice: Choice):
        update = await choice.job.updates.get()
        if isinstance(update, RowFailure):
            choice.done = True
            raise APIError(update.status, update.message, kind="server_error"
                           if update.status >= 500 else "invalid_request_error")
        return update

    async def _echo(self, choice: Choice, request: ApiRequest) -> Piece:
        """The prompt as the first piece; with logprobs, its tokens' (the first has none)."""
        prompt = choice.prompt
        if request.logprobs is None:
            return Piece(prompt.text, None, 0)
        update = await self._next(choice)  # an engine scoring a prompt posts that first
        if update.prompt_logprobs is None:
            raise APIError(500, "The engine did not score the prompt.", kind="server_error")
        tokens = TokenTexts(self.tokenizer).extend(prompt.ids, update.prompt_logprobs)
        return Piece(prompt.text, None, 0, tokens)

    def _observe(self, job, count: int) -> None:
        end = time.perf_counter()
        if job.first_token is not None:
            self.metrics.ttft.observe(job.first_token - job.submitted)
            if count > 1:
                self.metrics.tpot.observe((end - job.first_token) / (count - 1))
        self.metrics.e2e.observe(end - job.submitted)


def _lifespan(server: Server):
    """The engine (and the online distiller) run while the app does."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()
            if server.distiller is not None:
                server.distiller.close()

    return lifespan


def build_app(server: Server):
    app = FastAPI(title="distillspec", docs_url=None, redoc_url=None, lifespan=_lifespan(server))

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        server.metrics.requests.labels(request.url.path, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.get("/health")
    async def health():
        running, waiting = server.engine.load
        if not server.engine.alive:  # never a healthy-looking process that answers nothing
            return JSONResponse({"status": "dead", "reason": server.engine.dead or "not running"},
                                status_code=503)
        return {"status": "ok", "running": running, "waiting": waiting,
                "draft_version": server.engine.draft_version}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [{"id": server.model_id, "object": "model",
                                            "created": 0, "owned_by": "distillspec"}]}

    async def handle(request: Request, chat: bool):
        server.check_auth(request)
        api, prompts, choices = await server.start(await _json_body(request), chat)
        reply = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                 "object": "chat.completion" if chat else "text_completion",
                 "created": int(time.time()), "model": server.model_id}
        server.metrics.requests.labels(request.url.path, "200").inc()
        if api.stream:
            return StreamingResponse(_sse(server, api, prompts, choices, chat, reply),
                                     media_type="text/event-stream")
        results = await _collect(server, api, choices)
        out = [choice_json(i, r.text, r.finish, r.tokens, chat, delta=False)
               for i, r in sorted(results.items())]
        return {**reply, "choices": out, "usage": _usage(prompts, results.values())}

    @app.post("/v1/completions", openapi_extra=_body_doc(False, server.context, server.vocab))
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions",
              openapi_extra=_body_doc(True, server.context, server.vocab))
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


async def _collect(server: Server, api: ApiRequest, choices: list[Choice]) -> dict[int, Piece]:
    """A non-streaming reply: every choice's pieces joined into one (text, tokens, finish)."""
    results = {choice.index: Piece("", "stop", 0, None if api.logprobs is None else [])
               for choice in choices}
    async with contextlib.aclosing(server.pieces(api, choices)) as stream:
        async for choice, piece in stream:
            result = results[choice.index]
            result.text, result.count = result.text + piece.text, piece.count
            result.finish = piece.finish or result.finish
            if piece.tokens is not None:
                result.tokens += piece.tokens
    return results


def _usage(prompts: list[Prompt], pieces) -> dict:
    """Each prompt counted once (whatever n), every choice's tokens."""
    prompt_tokens = sum(len(prompt.ids) for prompt in prompts)
    completion_tokens = sum(piece.count for piece in pieces)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _sse(server: Server, api: ApiRequest, prompts, choices, chat: bool, reply: dict):
    """Server-sent events in OpenAI's chunk format (one choice per chunk); with
    ``stream_options.include_usage`` a last chunk with the usage and no choices. A client that
    goes away is cancelled (``Server.pieces`` closes)."""
    reply = {**reply, "object": "chat.completion.chunk" if chat else "text_completion"}
    if api.include_usage:
        reply["usage"] = None

    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    if chat:
        for choice in choices:
            first = {"index": choice.index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}
            yield event({**reply, "choices": [first]})
    last: dict[int, Piece] = {}
    try:
        async with contextlib.aclosing(server.pieces(api, choices)) as stream:
            async for choice, piece in stream:
                last[choice.index] = piece
                yield event({**reply, "choices": [choice_json(
                    choice.index, piece.text, piece.finish, piece.tokens, chat, delta=True)]})
    except APIError as error:  # the status line is sent: the error goes in the stream
        yield event(error.body())
        yield "data: [DONE]\n\n"
        return
    if api.include_usage:
        yield event({**reply, "choices": [], "usage": _usage(prompts, last.values())})
    yield "data: [DONE]\n\n"


def load_server(config: ServeConfig) -> Server:
    from distillspec.common.runtime import apply_threads
    from distillspec.tools.generate import auto_draft, load_for_decoding

    apply_threads(config.runtime)
    draft_spec = auto_draft(config.target, config.runtime) if config.draft == "auto" else config.draft
    if draft_spec == "none" and config.online_distill:
        raise ValueError("--online-distill needs a draft to improve: give --draft.")
    target, draft, tokenizer, _ = load_for_decoding(
        config.target, draft_spec, config.runtime, config.compile, config.max_batch)
    return Server(config, target, draft, tokenizer, draft_spec)


class _Uvicorn:
    """uvicorn's server with the shutdown we promise: the first SIGTERM/SIGINT stops accepting
    and drains in-flight requests for ``drain`` seconds (then cancels them); a second signal,
    or the drain deadline plus a grace second, exits at once; a dead engine exits non-zero."""

    def __init__(self, app, config: ServeConfig):
        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets)
                for server in self.servers:  # the port really bound (--port 0: a free one)
                    host, port = server.sockets[0].getsockname()[:2]
                    print(f"distillspec: listening on http://{host}:{port}/v1", file=sys.stderr,
                          flush=True)

            def handle_exit(self, sig, frame) -> None:
                if self.should_exit:  # the second signal: no more waiting
                    self.force_exit = True
                    os._exit(128 + int(sig))
                self.should_exit = True
                _deadline(config.drain_seconds + STOP_SECONDS + 1.0)

        self.server = Server(uvicorn.Config(app, host=config.host, port=config.port,
                                            log_level="warning",
                                            timeout_graceful_shutdown=config.drain_seconds))

    def stop(self, code: int) -> None:
        self.code = code
        self.server.should_exit = True
        _deadline(2.0)


def _deadline(seconds: float) -> None:
    """Exit the process if it is still alive after ``seconds`` (a request or thread that will
    not end must not keep a stopped server running)."""
    timer = threading.Timer(seconds, lambda: os._exit(1))
    timer.daemon = True
    timer.start()


def run_serve(config: ServeConfig) -> NoReturn:
    """Serve until SIGTERM/SIGINT (exit status 0 after draining) or an engine failure (exit
    status 1). Ends the process itself (it does not return)."""
    server = load_server(config)
    runner = _Uvicorn(build_app(server), config)
    runner.code = 0
    server.on_dead = lambda: runner.stop(1)
    # The URL comes once bound ("listening on ..."): with --port 0 only then is the port known.
    print(f"distillspec: serving {server.model_id} (draft: {config.draft}; {server.warmup})",
          file=sys.stderr)
    runner.server.run()
    # Everything is closed (lifespan: engine, online distiller); skip the interpreter's teardown
    # of the models and thread pools, measured at 2-3 s, so the drain deadline holds.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(runner.code)

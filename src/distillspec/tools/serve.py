"""``distillspec serve``: an OpenAI-compatible server on speculative decoding.

Starlette/FastAPI on uvicorn (the standard ASGI pair: FastAPI for routing and error handlers,
uvicorn for HTTP/1.1 + server-sent events). Endpoints: ``POST /v1/completions``,
``POST /v1/chat/completions`` (chat template applied), ``stream: true`` as SSE chunks in
OpenAI's format, ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus). Requests
join the running batch between speculative steps (``serve_engine.EngineWorker``); a greedy
request returns exactly the target's greedy output whatever else is in the batch. Errors are
OpenAI-style JSON with a 4xx status. Binds to 127.0.0.1 unless told otherwise; ``--api-key``
requires a bearer token.

Over 350 lines because the OpenAI request validation, the two endpoints and their streaming
share one error vocabulary; the decoding worker lives in ``serve_engine``, OSD in ``osd``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import NoReturn

from distillspec.decoding.params import SamplingConfig, check_seed
from distillspec.tools.configs import ServeConfig
from distillspec.tools.serve_engine import (
    STOP_SECONDS,
    Busy,
    EngineDead,
    EngineWorker,
    RowFailure,
)

try:  # module level: FastAPI resolves the handlers' annotations in this module's namespace
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
except ImportError as missing:  # pragma: no cover - the [serve] extra is not installed
    raise ValueError(
        "distillspec serve needs FastAPI and uvicorn: pip install 'distillspec[serve]'."
    ) from missing

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # per stop string
MAX_MESSAGES = 256
TEXT_CHARS_PER_TOKEN = 64  # prompt text beyond context x this is refused before tokenizing


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


# -- request parsing -----------------------------------------------------------------------------


@dataclass
class Params:
    max_tokens: int
    sampling: SamplingConfig
    stop: list[str]
    seed: int | None
    stream: bool


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name} must be a number, got {value!r}.", param=name)
    if not low <= value <= high:
        raise APIError(400, f"{name} must be between {low} and {high}, got {value}.", param=name)
    return float(value)


def parse_params(body: dict, default_max: int) -> Params:
    if body.get("n", 1) != 1:
        raise APIError(400, "Only n=1 is supported.", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}.",
                       param="max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise APIError(400, "top_p must be > 0.", param="top_p")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(
        stop
    ) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop must be a string or up to {MAX_STOP_STRINGS} strings.",
                       param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"each stop string must be at most {MAX_STOP_CHARS} characters.",
                       param="stop")
    seed = body.get("seed")
    try:
        check_seed(seed)
    except ValueError as error:
        raise APIError(400, str(error), param="seed") from None
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}.", param="stream")
    return Params(max_tokens, SamplingConfig(temperature=temperature, top_p=top_p), stop, seed,
                  bool(stream))


def request_schema(chat: bool, context: int) -> dict:
    """The JSON schema of the request body this server honours (published in /openapi.json;
    the fuzz test draws requests from it). Other fields are ignored for now."""
    common = {
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": context},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": context},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "n": {"type": "integer", "const": 1},
        "stop": {"anyOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
            {"type": "array", "maxItems": MAX_STOP_STRINGS,
             "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}}]},
        "seed": {"type": "integer", "minimum": -(1 << 63), "maximum": (1 << 64) - 1},
        "stream": {"type": "boolean"},
    }
    if chat:
        message = {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": {"type": "string"}}}
        common["messages"] = {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES,
                              "items": message}
        required = ["messages"]
    else:
        common["prompt"] = {"type": "string", "minLength": 1}
        required = ["prompt"]
    return {"type": "object", "required": required, "properties": common}


def _body_doc(chat: bool, context: int) -> dict:
    schema = request_schema(chat, context)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


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
        self.engine = EngineWorker(
            target, draft, speculation, max_batch=config.max_batch,
            max_waiting=config.max_waiting, metrics=self.metrics,
            on_finished=self.distiller.record if self.distiller else None,
            on_dead=lambda: self.on_dead and self.on_dead(),
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

    def encode(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str)
                and isinstance(m.get("role"), str) for m in messages
            ):
                raise APIError(400, f"messages must be a list of 1 to {MAX_MESSAGES} "
                               "{role, content} objects with string values.", param="messages")
            self._check_length(sum(len(m["content"]) for m in messages), "messages")
            if self.config.chat_template and getattr(self.tokenizer, "chat_template", None):
                text = self.tokenizer.apply_chat_template(
                    [{"role": m["role"], "content": m["content"]} for m in messages],
                    tokenize=False, add_generation_prompt=True)
                return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            text = "\n".join(m["content"] for m in messages)
            return list(self.tokenizer(text)["input_ids"])
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string.", param="prompt")
        self._check_length(len(prompt), "prompt")
        return list(self.tokenizer(prompt)["input_ids"])

    def _check_length(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit the context before spending time tokenizing it."""
        if chars > self.context * TEXT_CHARS_PER_TOKEN:
            raise APIError(400, f"The {param} ({chars} characters) cannot fit the context of "
                           f"{self.context} tokens.", param=param, code="context_length_exceeded")

    async def generate(self, body: dict, chat: bool):
        self.check_model(body)
        ids = self.encode(body, chat)
        params = parse_params(body, default_max=min(256, max(self.context - len(ids), 1)))
        if len(ids) + params.max_tokens > self.context:
            raise APIError(400, f"The prompt ({len(ids)} tokens) plus max_tokens "
                           f"({params.max_tokens}) exceeds the context of {self.context} tokens.",
                           param="max_tokens", code="context_length_exceeded")
        try:
            request_id, job = self.engine.submit(ids, params.max_tokens, params.sampling,
                                                 self.stop_ids, params.seed)
        except ValueError as error:
            raise APIError(400, str(error)) from None
        except Busy:
            raise APIError(503, f"The server is busy ({self.config.max_waiting} requests "
                           "waiting); retry later.", kind="server_error",
                           headers={"Retry-After": "1"}) from None
        except EngineDead as dead:
            raise APIError(503, f"The decoding engine is not running ({dead}); retry shortly.",
                           kind="server_error", headers={"Retry-After": "5"}) from None
        return request_id, job, params, len(ids)

    async def stream_text(self, request_id: int, job, params: Params):
        """Yields (new text, finish reason or None, tokens so far) as blocks are accepted;
        a stop string ends the text before it (and cancels the request)."""
        tokens: list[int] = []
        sent = ""
        try:
            while True:
                update = await job.updates.get()
                if isinstance(update, RowFailure):
                    raise APIError(update.status, update.message, kind="server_error"
                                   if update.status >= 500 else "invalid_request_error")
                tokens += update.new_tokens
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((text.find(s) for s in params.stop if s in text), default=-1)
                if cut >= 0:
                    self.engine.cancel(request_id)
                    yield text[len(sent):cut], "stop", len(tokens)
                    return
                reason = None
                if update.finished:
                    reason = {"eos": "stop", "length": "length"}.get(update.finish_reason, "stop")
                elif text.endswith("\ufffd"):  # wait for whole characters
                    continue
                yield text[len(sent):], reason, len(tokens)
                sent = text
                if reason is not None:
                    return
        finally:
            self._observe(job, len(tokens))

    def _observe(self, job, count: int) -> None:
        end = time.perf_counter()
        if job.first_token is not None:
            self.metrics.ttft.observe(job.first_token - job.submitted)
            if count > 1:
                self.metrics.tpot.observe((end - job.first_token) / (count - 1))
        self.metrics.e2e.observe(end - job.submitted)


def build_app(server: Server):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()
            if server.distiller is not None:
                server.distiller.close()

    app = FastAPI(title="distillspec", docs_url=None, redoc_url=None, lifespan=lifespan)

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
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        request_id, job, params, prompt_tokens = await server.generate(body, chat)
        created, uid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        server.metrics.requests.labels(request.url.path, "200").inc()
        if params.stream:
            return StreamingResponse(
                _sse(server, request_id, job, params, chat, uid, created, request),
                media_type="text/event-stream")
        text, reason, count = "", "stop", 0
        async for piece, finish, tokens in server.stream_text(request_id, job, params):
            text, reason, count = text + piece, finish or reason, tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                 "total_tokens": prompt_tokens + count}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": uid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": server.model_id, "choices": [choice], "usage": usage}

    @app.post("/v1/completions", openapi_extra=_body_doc(False, server.context))
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_body_doc(True, server.context))
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


async def _sse(server: Server, request_id, job, params, chat, uid, created, request):
    """Server-sent events in OpenAI's chunk format; a client that goes away is cancelled."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        data = {"id": uid, "object": kind, "created": created, "model": server.model_id,
                "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    finished = False
    try:
        if chat:
            yield chunk(None, None, first=True)
        try:
            async for piece, reason, _ in server.stream_text(request_id, job, params):
                yield chunk(piece, reason)
                finished = reason is not None
        except APIError as error:  # the status line is sent: the error goes in the stream
            finished = True
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            server.engine.cancel(request_id)  # the client disconnected mid-stream


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
    url = f"http://{config.host}:{config.port}/v1"
    print(f"distillspec: serving {server.model_id} on {url} (draft: {config.draft})",
          file=sys.stderr)
    runner.server.run()
    # Everything is closed (lifespan: engine, online distiller); skip the interpreter's teardown
    # of the models and thread pools, measured at 2-3 s, so the drain deadline holds.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(runner.code)

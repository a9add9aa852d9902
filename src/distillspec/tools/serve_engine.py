"""The serving engine: one supervised thread that owns the ``Decoder`` and runs continuous batching.

Requests arrive from the web handlers (any thread / event loop) through an inbox; between
speculative steps the engine admits them (up to ``max_batch`` live rows, the rest wait in
order), cancels the ones whose clients went away, swaps in a new draft when one is handed
over, runs one step and posts every row's new tokens back to its handler's asyncio queue. The
web side never touches the models, the engine never touches the network.

Faults are contained (``_recover``): a request that cannot be added fails alone; when a step
raises, every row of that step is re-run alone from the tokens its client already has, so the
row that fails alone is failed (HTTP 500) and the others carry on. Should the engine still
fail (``MAX_RECOVERIES`` failed steps in a row, or an error outside a step), it fails every
request, reports itself dead (``/health`` answers 503) and calls ``on_dead`` so that the
process exits non-zero for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from distillspec.common.runtime import release_openmp_threads
from distillspec.decoding import packed_linear
from distillspec.decoding.engine import Decoder
from distillspec.decoding.mode_policy import PLAIN, ModePolicy, arm_name, bucket
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.decoding.requests import Request, RowUpdate

log = logging.getLogger("distillspec.serve")
MAX_RECOVERIES = 3  # failed steps in a row (each with every row re-run alone) before giving up
STOP_SECONDS = 0.5  # how long stop() waits for the engine thread to leave its step (daemon)


class Busy(Exception):
    """The waiting bound is reached: the caller answers 503 with Retry-After."""


class EngineDead(Exception):
    """The engine thread has stopped (fault or shutdown): nothing more will be decoded."""


@dataclass
class RowFailure:
    """Posted instead of a ``RowUpdate`` when a request failed inside the engine."""

    request_id: int
    status: int  # 400: the request was at fault; 500: the engine failed on it; 503: shut down
    message: str
    finished: bool = True


@dataclass
class Job:
    """One request's way back to its handler."""

    request: Request
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


class EngineWorker:
    """Runs a Decoder in its own thread; ``submit`` / ``cancel`` / ``swap_draft`` are thread-safe."""

    def __init__(self, target, draft, speculation: SpeculationConfig, *, max_batch: int,
                 max_waiting: int = 1 << 30, metrics=None, on_finished=None,
                 on_dead: Callable[[], None] | None = None, policy: ModePolicy | None = None):
        self.models = (target, draft, speculation)  # to rebuild the Decoder after a fault
        self.decoder = Decoder(target, draft, speculation)
        self.policy = policy  # per step: speculate, a 1-token chain or plain, by measured tok/s
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.metrics = metrics
        self.on_finished = on_finished  # (request, output tokens) for the online buffer
        self.on_dead = on_dead
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}
        self.waiting: deque[int] = deque()
        self.outputs: dict[int, list[int]] = {}  # tokens posted to each request's handler
        self.scored: set[int] = set()  # requests whose prompt log-probabilities were posted
        self.ids = itertools.count()
        self.draft_version = 0
        self.dead: str | None = None  # why the engine stopped, once it has
        self.failed_steps = 0  # consecutive failed steps
        self._pending = 0  # accepted by submit, not yet decoding (the waiting bound counts these)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distillspec-engine", daemon=True)

    def start(self) -> None:
        """Start the engine thread, first freeing the calling thread's OpenMP workers: they
        would otherwise slow every parallel region of the engine's (``release_openmp_threads``)."""
        release_openmp_threads()
        self.thread.start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop the thread; once it has stopped, requests still open get 503. (A thread still
        inside a long step is left alone, daemon, rather than raced for its state.)"""
        self._stop.set()
        self.inbox.put(("wake", None))
        self.thread.join(timeout=timeout)
        with self._lock:
            stopped, self.dead = self.dead is None, self.dead or "stopped"
        if stopped and not self.thread.is_alive():
            self._fail_all(503, "The server is shutting down; retry on another instance.")

    @property
    def alive(self) -> bool:
        return self.dead is None and self.thread.is_alive()

    # -- called from the web handlers ---------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raises ValueError for an impossible request (before it is queued)."""
        self.decoder.check_request(request)

    def submit(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
               stop_ids: frozenset[int], seed: int | None, *, logprobs: int | None = None,
               prompt_logprobs: int | None = None) -> tuple[int, Job]:
        """Queue a request. Raises ValueError (bad request), Busy (waiting bound reached) or
        EngineDead; the bound counts every accepted request not yet decoding."""
        request_id = next(self.ids)
        request = Request(prompt_ids, max_new_tokens, sampling, stop_ids, seed, request_id,
                          logprobs, prompt_logprobs)
        self.check(request)
        job = Job(request, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:  # _die marks the engine dead under this lock, then drains the inbox
            if not self.alive:
                raise EngineDead(self.dead or "the engine thread is not running")
            if self._pending >= self.max_waiting:
                raise Busy
            self._pending += 1
            self.inbox.put(("add", job))
        return request_id, job

    def cancel(self, request_id: int) -> None:
        self.inbox.put(("cancel", request_id))

    def swap_draft(self, draft, version: int,
                   on_swapped: Callable[[], None] | None = None) -> None:
        """Serve ``draft`` from the next step on; ``on_swapped`` runs on the engine thread once
        it is in. A draft that cannot be swapped in is logged and the served one stays."""
        self.inbox.put(("swap", (draft, version, on_swapped)))

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests; waiting counts those still in the inbox too."""
        return len(self.decoder.rows) + len(self.decoder.queue), self._pending

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.decoder.has_work and not self.waiting)
                self._admit()
                if self.decoder.has_work:
                    self._step()
                self._gauges()
        except Exception as error:  # noqa: BLE001 - the supervisor: report, fail all, exit
            log.exception("distillspec engine stopped")
            self._die(f"{type(error).__name__}: {error}")

    def _step(self) -> None:
        decoder = self.decoder
        batch, admitting = len(decoder.rows) + len(decoder.queue), bool(decoder.queue)
        arm = self._arm(batch, admitting)
        decoder.lookahead_limit = arm
        # Where plain decoding has won for good, a joining row skips the draft's prefill: the
        # draft reads its prompt only if a drafting step comes before the row ends. (Asked only
        # when a row joins, so other steps skip the policy's settling test.)
        decoder.defer_draft_prefill = (admitting and arm == PLAIN and self.policy is not None
                                       and self.policy.settled(bucket(batch)))
        # After plain steps the draft has the skipped tokens to read (a chain leaves it at most
        # 2): the first drafting step reads them, a one-off cost of switching arms.
        catching_up = arm != PLAIN and any(len(row.draft_pending) > 2 for row in decoder.rows)
        tunings, start = packed_linear.tunings(), time.perf_counter()
        try:
            updates = decoder.step()
        except Exception as error:  # noqa: BLE001 - contained: see _recover
            self._recover(error)
            return
        seconds = time.perf_counter() - start
        # A step that admitted rows also ran their prefill, one that timed a kernel choice (a
        # width the start-up warming did not reach) and one that caught the draft up paid a
        # one-off cost: none measures the arm's steady speed. Unrecorded, a re-measurement is
        # chosen again at the next step, which then runs the arm without that cost.
        # A prompt lookup block (rows whose text repeats) is not the arm either.
        if (self.policy is not None and not admitting and not catching_up
                and not decoder.ran_lookup and packed_linear.tunings() == tunings):
            self.policy.record(batch, arm, sum(len(u.new_tokens) for u in updates), seconds)
            if self.metrics is not None:
                self.metrics.record_rate(batch, arm, self.policy)
        if self.metrics is not None:
            mode = arm_name(arm) if decoder.draft is not None else "plain"
            self.metrics.steps.labels("lookup" if decoder.ran_lookup else mode).inc()
        self.failed_steps = 0
        self.decoder.finished.clear()  # the server keeps no finished rows (bounded memory)
        for update in updates:
            self._post(update)

    def _arm(self, batch: int, admitting: bool = False) -> int | None:
        """This step's draft-length limit (``Decoder.lookahead_limit``): the policy's choice,
        except while a seeded sampled row is live: its tokens depend on its draft lengths, so
        it speculates as configured and its seed reproduces its answer whatever shares the
        batch (greedy rows are the target's own tokens under every arm).

        A step that admits rows where the policy chose the configured tree runs a chain as deep
        as the tree instead (at most gamma): rows joining a chain read their prompts in its
        verify pass (a ragged call), where a tree's verify needs a prefill pass before it,
        about one more step's cost, against one block's few tokens of the tree's advantage.
        /metrics counts such a step under its chain (gamma1 for a one-level tree)."""
        if self.policy is None or self.decoder.draft is None:
            return None
        rows = self.decoder.rows + self.decoder.queue
        if any(r.request.seed is not None and not r.request.sampling.greedy for r in rows):
            return None
        arm = self.policy.choose(batch)
        if (arm is None and admitting and self.decoder.tree is not None
                and self.decoder.chain_reads_joins()):
            return self.decoder.tree.depth
        return arm

    def _drain(self, block: bool) -> None:
        try:
            message = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*message)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            self.jobs[payload.request.request_id] = payload
            self.outputs[payload.request.request_id] = []
            self.waiting.append(payload.request.request_id)
        elif kind == "cancel":
            if payload in self.waiting:
                self.waiting.remove(payload)
                self._unpend()
                self._post(RowUpdate(payload, [], True, "cancelled"))
            else:
                self.decoder.cancel(payload)
        elif kind == "swap":
            draft, version, on_swapped = payload
            try:  # replace_draft assigns the new draft last: a failure leaves the old one
                self.decoder.replace_draft(draft)
            except Exception as error:  # noqa: BLE001 - the served draft stays
                log.error("distillspec: draft %s could not be swapped in, the served draft "
                          "stays: %s: %s", version, type(error).__name__, error)
                return
            self.models = (self.models[0], draft, self.models[2])
            self.draft_version = version
            if self.policy is not None:  # the new draft's acceptance is another
                self.policy.forget_speculative()
                if self.metrics is not None:
                    self.metrics.reset_rates(self.policy)
            if self.metrics is not None:
                self.metrics.draft_version.set(version)
            if on_swapped is not None:
                on_swapped()

    def _admit(self) -> None:
        running, _ = self.load
        while self.waiting and running < self.max_batch:
            job = self.jobs[self.waiting.popleft()]
            self._unpend()
            try:
                self.decoder.add(job.request)
            except Exception as error:  # noqa: BLE001 - this request fails, not the engine
                self._fail(job.request.request_id, error)
                continue
            running += 1

    def _unpend(self) -> None:
        with self._lock:
            self._pending -= 1

    # -- faults --------------------------------------------------------------------------------

    def _recover(self, error: Exception) -> None:
        """A step raised: re-run each of its rows alone (from what its client already has) on a
        fresh Decoder; a row that fails alone is failed, the others go on together."""
        # A step may fail after moving rows from the queue (admission) or to `finished`.
        decoder = self.decoder
        rows = {row.request.request_id: row
                for row in decoder.finished + decoder.queue + decoder.rows}
        admitted = [rid for rid in self.jobs if rid not in self.waiting]
        log.error("distillspec: a step failed for requests %s: %s: %s", admitted,
                  type(error).__name__, error)
        self.failed_steps += 1
        if self.failed_steps >= MAX_RECOVERIES:
            raise RuntimeError(f"{self.failed_steps} failed steps in a row") from error
        survivors = []
        for request_id in admitted:
            row = rows.get(request_id)
            generator = row.generator if row is not None else self._generator(request_id)
            if row is not None and row.finish_reason == "cancelled":
                self._post(RowUpdate(request_id, [], True, "cancelled"))
            elif len(admitted) == 1 or not self._alone_ok(request_id, generator):
                self._fail(request_id, error, status=500)
            elif request_id in self.jobs:
                survivors.append((request_id, generator))
        self.decoder = Decoder(*self.models)
        for request_id, generator in survivors:
            self.decoder.add(self._continuation(request_id), generator=generator)

    def _alone_ok(self, request_id: int, generator: torch.Generator | None) -> bool:
        """One step of this row alone on a fresh Decoder (its updates are posted)."""
        self.decoder = Decoder(*self.models)
        try:
            self.decoder.add(self._continuation(request_id), generator=generator)
            updates = self.decoder.step()
        except Exception as error:  # noqa: BLE001 - this row is the culprit
            log.error("distillspec: request %s fails alone: %s", request_id, error)
            return False
        for update in updates:
            self._post(update)
        return True

    def _generator(self, request_id: int) -> torch.Generator | None:
        """A seeded request's own generator, for a row lost before it was admitted."""
        seed = self.jobs[request_id].request.seed
        return None if seed is None else torch.Generator(
            device=self.decoder.device).manual_seed(seed)

    def _continuation(self, request_id: int) -> Request:
        """The request as its client sees it now: prompt + tokens already sent, the rest of the
        budget. (A seeded row's later tokens may differ from a run without the fault.)"""
        request, sent = self.jobs[request_id].request, self.outputs[request_id]
        scoring = None if request_id in self.scored else request.prompt_logprobs
        return Request(request.prompt_ids + sent, request.max_new_tokens - len(sent),
                       request.sampling, request.stop_token_ids, None, request_id,
                       request.logprobs, scoring)

    def _fail(self, request_id: int, error: Exception, status: int | None = None) -> None:
        status = status or (400 if isinstance(error, ValueError) else 500)
        detail = str(error) if status == 400 else f"{type(error).__name__}: {error}"
        self._post(RowFailure(request_id, status, f"The request failed in the engine: {detail}"))

    def _die(self, reason: str) -> None:
        with self._lock:  # no submit can queue a job after this
            self.dead = reason
        self._fail_all(503, f"The decoding engine stopped ({reason}); retry shortly.")
        if self.on_dead is not None:
            self.on_dead()

    def _fail_all(self, status: int, message: str) -> None:
        while True:  # jobs still in the inbox were accepted too
            try:
                kind, payload = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._handle(kind, payload)
        for request_id in list(self.jobs):
            self._post(RowFailure(request_id, status, message))
        self.waiting.clear()
        with self._lock:
            self._pending = 0

    # -- results -------------------------------------------------------------------------------

    def _post(self, update: RowUpdate | RowFailure) -> None:
        job = self.jobs.get(update.request_id)
        if job is None:
            return
        if isinstance(update, RowUpdate):
            if update.new_tokens and job.first_token is None:
                job.first_token = time.perf_counter()
            self.outputs[update.request_id] += update.new_tokens
            if update.prompt_logprobs is not None:
                self.scored.add(update.request_id)
            if self.metrics is not None:
                self.metrics.record_step(update)
        # A closed event loop (shutdown) has nobody left to tell.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(job.updates.put_nowait, update)
        if update.finished:
            output = self.outputs.pop(update.request_id)
            self.jobs.pop(update.request_id)
            self.scored.discard(update.request_id)
            reason = getattr(update, "finish_reason", "error")
            if self.on_finished is not None and reason not in ("cancelled", "error"):
                try:  # a bystander (the online buffer): its fault must not stop the engine
                    self.on_finished(job.request, output)
                except Exception:  # noqa: BLE001 - logged; the request was answered
                    log.exception("distillspec: on_finished failed for request %s",
                                  update.request_id)

    def _gauges(self) -> None:
        if self.metrics is not None:
            running, waiting = self.load
            self.metrics.running.set(running)
            self.metrics.waiting.set(waiting)

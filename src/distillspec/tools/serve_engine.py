"""The serving engine: one thread that owns the ``Decoder`` and runs continuous batching.

Requests arrive from the web handlers (any thread / event loop) through an inbox; between
speculative steps the engine admits them (up to ``max_batch`` live rows, the rest wait in
order), cancels the ones whose clients went away, swaps in a new draft when one is handed
over, runs one step and posts every row's new tokens back to its handler's asyncio queue. The
web side never touches the models, the engine never touches the network.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from distillspec.decoding.engine import Decoder
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.decoding.requests import Request, RowUpdate


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
                 metrics=None, on_finished=None):
        self.decoder = Decoder(target, draft, speculation)
        self.max_batch = max_batch
        self.metrics = metrics
        self.on_finished = on_finished  # (request, output tokens) for the online buffer
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}
        self.waiting: deque[int] = deque()
        self.outputs: dict[int, list[int]] = {}
        self.ids = itertools.count()
        self.draft_version = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distillspec-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        self.thread.join(timeout=10)

    # -- called from the web handlers ---------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raises ValueError for an impossible request (before it is queued)."""
        self.decoder.check_request(request)

    def submit(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
               stop_ids: frozenset[int], seed: int | None) -> tuple[int, Job]:
        request_id = next(self.ids)
        request = Request(prompt_ids, max_new_tokens, sampling, stop_ids, seed, request_id)
        self.check(request)
        job = Job(request, asyncio.get_running_loop(), asyncio.Queue())
        self.inbox.put(("add", job))
        return request_id, job

    def cancel(self, request_id: int) -> None:
        self.inbox.put(("cancel", request_id))

    def swap_draft(self, draft, version: int) -> None:
        self.inbox.put(("swap", (draft, version)))

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self.decoder.rows) + len(self.decoder.queue), len(self.waiting)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.decoder.has_work and not self.waiting)
            self._admit()
            if self.decoder.has_work:
                for update in self.decoder.step():
                    self._post(update)
            self._gauges()

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
                self._post(RowUpdate(payload, [], True, "cancelled"))
            else:
                self.decoder.cancel(payload)
        elif kind == "swap":
            draft, version = payload
            self.decoder.replace_draft(draft)
            self.draft_version = version
            if self.metrics is not None:
                self.metrics.draft_version.set(version)

    def _admit(self) -> None:
        running, _ = self.load
        while self.waiting and running < self.max_batch:
            job = self.jobs[self.waiting.popleft()]
            self.decoder.add(job.request)
            running += 1

    def _post(self, update: RowUpdate) -> None:
        job = self.jobs.get(update.request_id)
        if job is None:
            return
        if update.new_tokens and job.first_token is None:
            job.first_token = time.perf_counter()
        self.outputs[update.request_id] += update.new_tokens
        if self.metrics is not None:
            self.metrics.record_step(update)
        job.loop.call_soon_threadsafe(job.updates.put_nowait, update)
        if update.finished:
            output = self.outputs.pop(update.request_id)
            self.jobs.pop(update.request_id)
            if self.on_finished is not None and update.finish_reason != "cancelled":
                self.on_finished(job.request, output)

    def _gauges(self) -> None:
        if self.metrics is not None:
            running, waiting = self.load
            self.metrics.running.set(running)
            self.metrics.waiting.set(waiting)

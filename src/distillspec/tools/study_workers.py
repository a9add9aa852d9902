"""``distillspec study --workers N``: N processes on this machine run the study's cells.

Why a process pool here and not accelerate or a SLURM array: a cell is a whole ``distill`` run
on one device, independent of the others, while ``accelerate launch`` starts the ranks of *one*
job that step together; an array job needs a scheduler and a job per cell, each paying the
start-up and the target's loading again. Here each worker loads the target once and takes cell
after cell, the study's one-off work (answers, top-k, initial drafts, cost model) is done once
by the main process before the workers start, and everything stays in one folder and one
command (the study of many machines is many such commands on disjoint tasks or seeds).

The main process hands out one cell id at a time in grid order; a worker runs it exactly as the
1-worker study does (``study.finish_cell``: resume from its checkpoint, write
``records/<id>.json``, drop its checkpoints) and reports the record. No claim files are needed:
the main process knows which worker holds which cell. A worker that dies (killed, out of
memory) has its cell handed to a new worker, which resumes it from its last checkpoint; a cell
whose worker dies twice stops the study (rerun the command to try again). Killing the whole
study leaves records for finished cells and checkpoints for running ones: the same command
resumes. Ctrl-C: every worker finishes its step, saves a checkpoint and stops.

Each worker gets 1/N of the CPU threads, and on CUDA the visible GPUs in turn; its output goes
to ``logs/worker-<i>.log`` (the main process prints which cell runs where and each result).
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TIMEOUT_S = 600  # how long workers get to save a checkpoint and stop after an interrupt


def _say(message: str) -> None:
    print(f"study: {message}", file=sys.stderr, flush=True)


def worker_threads(total: int, workers: int) -> int:
    """CPU threads per worker: an equal share of ``total``, at least one."""
    return max(1, total // workers)


def worker_gpus(device: str, workers: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each worker: the visible GPUs in turn (None: leave as is,
    on CPU or an explicit cuda:N)."""
    import torch

    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return [None] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return [ids[i % len(ids)] for i in range(workers)]


@dataclass
class _Worker:
    index: int
    process: Any
    jobs: Any  # the cell ids this worker is handed, None to stop
    cell: str | None = None  # the cell it runs
    stopping: bool = False  # told to stop (None sent): it exits when its cell ends


class _Pool:
    """The workers and the cells still to hand out."""

    def __init__(self, config, tasks, cost, pending: list[str], workers: int) -> None:
        import multiprocessing

        import torch

        self.context = multiprocessing.get_context("spawn")  # fork and torch's threads clash
        self.results = self.context.Queue()
        self.args = (config, tasks, cost)
        self.threads = worker_threads(config.runtime.threads or torch.get_num_threads(), workers)
        self.gpus = worker_gpus(config.runtime.device, workers)
        self.log_dir = config.layout.root / "logs"
        self.queue = deque(pending)
        self.retried: set[str] = set()
        self.workers: dict[int, _Worker] = {}
        self.numbers = itertools.count()
        for _ in range(workers):
            self.start()

    def start(self) -> None:
        index = next(self.numbers)
        jobs = self.context.Queue()
        gpu = self.gpus[index % len(self.gpus)]
        process = self.context.Process(
            target=_work, name=f"study-worker-{index}",
            args=(index, *self.args, self.threads, gpu, self.log_dir, jobs, self.results))
        process.start()
        self.workers[index] = _Worker(index, process, jobs)

    def alive(self) -> bool:
        return any(w.process.is_alive() for w in self.workers.values())

    def hand_out(self, worker: _Worker) -> None:
        """The next cell to an idle worker, or tell it to stop."""
        worker.cell = None
        if self.queue and not worker.stopping:
            worker.cell = self.queue.popleft()
            worker.jobs.put(worker.cell)
            _say(f"{worker.cell} -> worker {worker.index} (log: {self.log_dir.name}/"
                 f"worker-{worker.index}.log)")
        elif not worker.stopping:
            worker.stopping = True
            worker.jobs.put(None)

    def stop(self, signum: int | None) -> None:
        """No more cells; ``signum`` (SIGINT: checkpoint and stop) to the workers in a cell."""
        self.queue.clear()
        for worker in self.workers.values():
            if worker.process.is_alive() and not worker.stopping:
                worker.stopping = True
                worker.jobs.put(None)
                if signum is not None and worker.cell is not None:
                    os.kill(worker.process.pid, signum)

    def messages(self, timeout: float) -> list[tuple]:
        """What the workers reported: the first within ``timeout``, then all that are there."""
        found = []
        try:
            found.append(self.results.get(timeout=timeout))
            while True:
                found.append(self.results.get_nowait())
        except queue.Empty:
            return found

    def close(self) -> None:
        """Wait for the workers to exit (reading their reports, so none blocks on a full
        pipe); kill those still running after TIMEOUT_S."""
        deadline = time.monotonic() + TIMEOUT_S
        while self.alive() and time.monotonic() < deadline:
            self.messages(0.2)
        for worker in self.workers.values():
            if worker.process.is_alive():
                worker.process.kill()
            worker.process.join()


def run_on_workers(config, tasks: dict, cost, pending: list[str], workers: int,
                   finished: Callable[[dict[str, Any], bool], None]) -> None:
    """Run the ``pending`` cells (ids, in order) on ``workers`` processes; ``finished(record,
    resumed)`` in this process as each ends. Raises what a cell raised (the other workers save
    a checkpoint and stop first), or KeyboardInterrupt after Ctrl-C."""
    pool = _Pool(config, tasks, cost, pending, workers)
    interrupted = False
    try:
        while pool.alive():
            try:
                found = pool.messages(0.5)
            except KeyboardInterrupt:
                if interrupted:  # a second Ctrl-C: stop now
                    raise
                interrupted = True
                _say("interrupted: each worker finishes its step, saves a checkpoint and stops")
                pool.stop(None)  # Ctrl-C reached the workers too: they share the terminal
                continue
            for message in found:
                interrupted |= _handle(pool, message, finished)
            if not found:
                _check_alive(pool, config, finished)
        for message in pool.messages(0):  # the last reports of workers that have exited
            interrupted |= _handle(pool, message, finished)
    except BaseException:
        pool.stop(signal.SIGINT)
        pool.close()
        raise
    pool.close()
    if interrupted:
        raise KeyboardInterrupt(
            "study interrupted; the running cells saved a checkpoint. Rerun the same study "
            "command to resume: finished cells are kept, those cells continue from their "
            "checkpoints."
        )
    left = [cell for cell in pending if _record(config, cell) is None]
    if left:  # every worker exited without being told: reported by _check_alive, not here
        raise RuntimeError(f"the workers stopped with cells left: {', '.join(left)}.")


def _handle(pool: _Pool, message: tuple, finished) -> bool:
    """One worker's report; True when it was interrupted."""
    kind, index, cell, payload = message
    worker = pool.workers.get(index)
    if worker is None:  # a worker found dead earlier, whose record was read from disk
        return False
    if kind == "ready":
        pool.hand_out(worker)
    elif kind == "done":
        finished(*payload)
        pool.hand_out(worker)
    elif kind == "interrupted":
        worker.stopping, worker.cell = True, None
        pool.stop(None)
        return True
    elif kind == "failed":
        name, text = payload
        log = pool.log_dir / f"worker-{index}.log"
        where = f"cell {cell}" if cell else "loading the target"
        if name == "ValueError":
            raise ValueError(f"{where}: {text}")
        raise RuntimeError(f"worker {index} failed on {where}: {name}: {text} (traceback in "
                           f"{log})")
    return False


def _check_alive(pool: _Pool, config, finished) -> None:
    """A worker that exited without being told to: its cell goes to a new worker (once)."""
    for worker in list(pool.workers.values()):
        if worker.stopping or worker.process.is_alive():
            continue
        del pool.workers[worker.index]
        code = worker.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if worker.cell is None:
            raise RuntimeError(
                f"worker {worker.index} stopped ({how}) while loading the target, before taking "
                "a cell (out of memory?). Use fewer --workers; see "
                f"{pool.log_dir / f'worker-{worker.index}.log'}."
            )
        record = _record(config, worker.cell)
        if record is not None:  # it died after writing the record: the cell is done
            finished(record, True)
        elif worker.cell in pool.retried:
            raise RuntimeError(
                f"cell {worker.cell}: its worker stopped ({how}) twice. Its checkpoints are "
                "kept: rerun the same study command to try again (it resumes there), or see "
                f"{pool.log_dir / f'worker-{worker.index}.log'}."
            )
        else:
            pool.retried.add(worker.cell)
            pool.queue.appendleft(worker.cell)
            _say(f"worker {worker.index} stopped ({how}) in cell {worker.cell}; a new worker "
                 "reruns it from its last checkpoint")
        if pool.queue:
            pool.start()


def _record(config, cell_id: str) -> dict[str, Any] | None:
    import json

    path = config.layout.root / "records" / f"{cell_id}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# -- in the worker process -------------------------------------------------------------------------


def _work(index: int, config, tasks: dict, cost, threads: int, gpu: str | None, log_dir,
          jobs, results) -> None:
    """A worker: load the target once, run the cells it is handed until it gets None."""
    _die_with_parent()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"worker-{index}.log", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    from distillspec.common.config import replace
    from distillspec.tools import study
    from distillspec.training import setup

    torch.set_num_threads(threads)
    config = replace(config, recipe={"runtime": {"threads": threads}})  # distill applies it
    cells = {cell.id: cell for cell in config.grid().cells}
    cell_id = None
    try:
        models = setup.load_target(config.recipe)
        results.put(("ready", index, None, None))
        while (cell_id := jobs.get()) is not None:
            cell = cells[cell_id]
            record = study.finish_cell(config, cell, tasks[cell.task.name], models, cost)
            results.put(("done", index, cell_id, record))
    except KeyboardInterrupt:
        results.put(("interrupted", index, cell_id, None))
    except Exception as error:  # reported to the main process, which stops the study
        traceback.print_exc()
        results.put(("failed", index, cell_id, (type(error).__name__, str(error))))


def _die_with_parent() -> None:
    """On Linux, the kernel kills this worker when the main process dies (even by SIGKILL), so
    no orphan keeps writing into a cell that a rerun of the study resumes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)

"""Do ragged joins pay? A same-run A/B of the server's engine loop in one process.

``../serve-defer/replay.py``'s closed loop (the server's ``EngineWorker._admit`` and ``_step``,
no HTTP: ``concurrency`` clients each send their next greedy 48-token request, the chat
held-out prompts with the chat template, as soon as their last one ends, ``count`` requests per
level), for four workers that share the loaded models: the target alone and the SD server
(ModePolicy, deferral), each with rows joining a plain step in the step's own target pass
(``ragged``, ``engine.RAGGED_JOINS``) and with a prefill pass of their own first (``prefill``,
as before). One warm-up level each, then ``rounds`` timed levels in alternating order.
``--rate R``: an open loop instead, requests arriving as a Poisson process of R per second (the
same arrival times for the four workers of a round), at most ``concurrency`` in the batch.

    python replay.py [--concurrency 16] [--count 64] [--rounds 4] [--rate 0] [--out replay.json]
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "serve-defer"), str(HERE.parent / "serve-anatomy")]
import replay as defer_replay  # noqa: E402  (its closed-loop level)
from anatomy import setup  # noqa: E402  (the server's default pair, setting and prompts)

import distillspec.decoding.engine as engine  # noqa: E402
from distillspec.decoding.params import SamplingConfig  # noqa: E402
from distillspec.decoding.requests import Request  # noqa: E402
from distillspec.tools.serve_engine import EngineWorker, Job  # noqa: E402

MODES = ("plain-ragged", "plain-prefill", "sd-ragged", "sd-prefill")


def open_level(worker: EngineWorker, prompts, stop, rate: float, count: int, steps: list,
               seed: int) -> float:
    """One open-loop level: ``count`` requests arriving as a Poisson process of ``rate`` per
    second (the same arrival times for every worker of a round), admitted up to the worker's
    batch limit; output tokens/s over the level's wall time."""
    gaps = random.Random(seed)
    arrivals = list(itertools.accumulate(gaps.expovariate(rate) for _ in range(count)))
    sent = emitted = 0
    start = time.perf_counter()
    while sent < count or worker.decoder.has_work or worker.waiting:
        now = time.perf_counter() - start
        while sent < count and arrivals[sent] <= now:
            request = Request(prompts[sent % len(prompts)], 48, SamplingConfig(), stop, None,
                              (len(steps) << 20) + sent)
            worker._pending += 1
            worker._handle("add", Job(request, defer_replay.NOBODY,
                                      types.SimpleNamespace(put_nowait=None)))
            sent += 1
        worker._admit()
        if not worker.decoder.has_work:
            time.sleep(max(0.0, min(arrivals[sent] - now, 0.05)) if sent < count else 0)
            continue
        admitting = bool(worker.decoder.queue)
        before = {rid: len(worker.outputs[rid]) for rid in worker.jobs}
        step_start = time.perf_counter()
        worker._step()
        steps.append((admitting, time.perf_counter() - step_start))
        for rid, count_before in before.items():
            now_tokens = (len(worker.outputs[rid]) if rid in worker.outputs
                          else defer_replay.FINAL.pop(rid))
            emitted += now_tokens - count_before
    return emitted / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests per second, open loop (0: closed loop)")
    parser.add_argument("--out", default="replay.json")
    args = parser.parse_args()
    (target, draft), speculation, stop, prompts, spec = setup("none")
    workers, steps = {}, {mode: [] for mode in MODES}

    def run(mode: str, record: list, seed: int = 0) -> float:
        engine.RAGGED_JOINS = mode.endswith("ragged")
        if args.rate:
            return open_level(workers[mode], prompts, stop, args.rate, args.count, record, seed)
        return defer_replay.level(workers[mode], prompts, stop, args.concurrency, args.count,
                                  record)

    for mode in MODES:
        sd = mode.startswith("sd")
        workers[mode] = defer_replay.server_worker(target, draft if sd else None, speculation,
                                                   args.concurrency)
        run(mode, [])  # warm-up: kernels, and the SD policy learns
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    started = time.perf_counter()
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
            rates[mode].append(run(mode, steps[mode], seed=r + 1))
        print(r, {mode: round(values[-1], 1) for mode, values in rates.items()},
              f"{time.perf_counter() - started:.0f} s", flush=True)
    summary = defer_replay.summarise(rates, steps)
    for kind in ("plain", "sd"):
        ragged, prefill = summary[f"{kind}-ragged"], summary[f"{kind}-prefill"]
        ragged["ratio_to_prefill_by_round"] = [
            a / b for a, b in zip(ragged["tokens_per_s"], prefill["tokens_per_s"])]
        ragged["median_ratio_to_prefill"] = statistics.median(ragged["ratio_to_prefill_by_round"])
    for way in ("ragged", "prefill"):
        sd, plain = summary[f"sd-{way}"], summary[f"plain-{way}"]
        sd["ratio_to_plain_by_round"] = [a / b for a, b in zip(sd["tokens_per_s"],
                                                                plain["tokens_per_s"])]
    defer_replay.write(args.out, {"concurrency": args.concurrency, "count": args.count,
                                  "rounds": args.rounds, "rate": args.rate, "setting": spec,
                                  "levels": summary})


if __name__ == "__main__":
    main()

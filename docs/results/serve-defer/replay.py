"""Does skipping the draft's prefill where plain has settled pay? A same-run A/B in one process.

The server's engine loop without HTTP (``EngineWorker._admit`` then ``EngineWorker._step``: the
ModePolicy, its catch-up and settling rules, and the deferral): ``concurrency`` clients each
send their next request (greedy, 48 tokens, the chat held-out prompts with the chat template)
as soon as the last one ends, ``count`` requests per level. Three workers share the loaded
models: ``plain`` (no draft), ``defer`` (the server as it is: rows joining a batch size settled
on plain skip the draft's prefill) and ``eager`` (the same with the draft always prefilled, as
before), after one warm-up level each (their policies learn), then ``rounds`` timed levels in
alternating order. Reports each level's output tokens/s, the admission steps (count, seconds)
and decoding seconds.

    python replay.py [--concurrency 16] [--count 64] [--rounds 6] [--out replay.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve-anatomy"))
from anatomy import setup  # noqa: E402  (the server's default pair, setting and prompts)

from distillspec.decoding.engine import Decoder  # noqa: E402
from distillspec.decoding.mode_policy import ModePolicy  # noqa: E402
from distillspec.decoding.params import SamplingConfig  # noqa: E402
from distillspec.decoding.requests import Request  # noqa: E402
from distillspec.tools.serve_engine import EngineWorker, Job  # noqa: E402

MODES = ("plain", "defer", "eager")
# A Job's way back to an HTTP handler; nobody listens here.
NOBODY = types.SimpleNamespace(call_soon_threadsafe=lambda *args: None)


class EagerDecoder(Decoder):
    """The Decoder before the change: the draft prefills every joining row."""

    defer_draft_prefill = property(lambda self: False, lambda self, value: None)


def level(worker: EngineWorker, prompts, stop, concurrency: int, count: int, steps: list) -> float:
    """One closed-loop level through the worker's own admission and step; output tokens/s."""
    sent = emitted = 0
    live: set[int] = set()
    start = time.perf_counter()
    while sent < count or live:
        while sent < count and len(live) < concurrency:
            request = Request(prompts[sent % len(prompts)], 48, SamplingConfig(), stop, None,
                              (len(steps) << 20) + sent)
            worker._pending += 1
            worker._handle("add", Job(request, NOBODY, types.SimpleNamespace(put_nowait=None)))
            live.add(request.request_id)
            sent += 1
        worker._admit()
        admitting = bool(worker.decoder.queue)
        before = {rid: len(worker.outputs[rid]) for rid in worker.jobs}
        step_start = time.perf_counter()
        worker._step()
        steps.append((admitting, time.perf_counter() - step_start))
        for rid, count_before in before.items():  # a finished request's tokens left outputs
            now = len(worker.outputs[rid]) if rid in worker.outputs else FINAL.pop(rid)
            emitted += now - count_before
        live -= {rid for rid in live if rid not in worker.jobs}
    return emitted / (time.perf_counter() - start)


FINAL: dict[int, int] = {}  # request id -> tokens, recorded as each request finishes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="replay.json")
    args = parser.parse_args()
    (target, draft), speculation, stop, prompts, spec = setup("none")
    workers, steps = {}, {mode: [] for mode in MODES}
    for mode in MODES:
        worker = server_worker(target, None if mode == "plain" else draft, speculation,
                               args.concurrency)
        if mode == "eager":
            worker.decoder.__class__ = EagerDecoder
        workers[mode] = worker
        level(worker, prompts, stop, args.concurrency, args.count, [])  # warm-up
    rates = alternating_levels(workers, prompts, stop, args, steps)
    summary = summarise(rates, steps)
    for mode in MODES:
        summary[mode]["ratio_to_plain_by_round"] = [a / b for a, b in zip(rates[mode],
                                                                          rates["plain"])]
    for mode in ("defer", "eager"):
        summary[mode]["median_ratio_to_plain"] = (summary[mode]["median_tokens_per_s"]
                                                  / summary["plain"]["median_tokens_per_s"])
    write(args.out, {"concurrency": args.concurrency, "count": args.count,
                     "rounds": args.rounds, "setting": spec, "levels": summary})


def alternating_levels(workers: dict, prompts, stop, args, steps: dict) -> dict[str, list[float]]:
    """``args.rounds`` timed levels of every worker, in alternating order (A B, B A, ...): each
    mode's tokens/s per level; each step's (admitting, seconds) appended to ``steps[mode]``."""
    modes = tuple(workers)
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    started = time.perf_counter()
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else tuple(reversed(modes)):
            rates[mode].append(level(workers[mode], prompts, stop, args.concurrency, args.count,
                                     steps[mode]))
        print(r, {mode: round(values[-1], 1) for mode, values in rates.items()},
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return rates


def server_worker(target, draft, speculation, max_batch: int) -> EngineWorker:
    """The server's engine worker: with a draft, the mode policy for its setting; finished
    requests' token counts recorded in ``FINAL``."""
    policy = (ModePolicy.for_speculation(speculation.gamma, speculation.tree_shape is not None)
              if draft is not None else None)
    return EngineWorker(target, draft, speculation, max_batch=max_batch, policy=policy,
                        on_finished=lambda request, output: FINAL.__setitem__(
                            request.request_id, len(output)))


def summarise(rates: dict[str, list[float]], steps: dict[str, list]) -> dict[str, dict]:
    """Per mode: its levels' tokens/s (and median), its steps, and the admission steps' count,
    seconds and mean against the other steps' seconds."""
    summary = {}
    for mode, record in steps.items():
        admissions = [s for admitting, s in record if admitting]
        summary[mode] = {
            "tokens_per_s": rates[mode], "median_tokens_per_s": statistics.median(rates[mode]),
            "steps": len(record), "admission_steps": len(admissions),
            "admission_s": sum(admissions),
            "mean_admission_step_ms": 1e3 * statistics.mean(admissions) if admissions else None,
            "decoding_s": sum(s for admitting, s in record if not admitting),
        }
    return summary


def write(out: str, record: dict) -> None:
    """``record`` to ``out`` as JSON, and its levels' summaries (without the per-round rates)
    to stdout."""
    Path(out).write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps({m: {k: v for k, v in s.items() if k != "tokens_per_s"}
                      for m, s in record["levels"].items()}, indent=1))


if __name__ == "__main__":
    main()

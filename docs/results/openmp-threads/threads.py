"""A decoding step in the server's engine thread, with and without the main thread's OpenMP team.

The server loads and warms its models in the main thread, then decodes in an engine thread.
This times one 16-row plain decoding step of the default target (48-token prompts) three ways
in one process, alternating, ``--rounds`` times:

* ``main``: in the main thread (which loaded the model);
* ``thread``: in a new thread while the main thread's OpenMP workers are alive (the server
  before ``release_openmp_threads``);
* ``thread, main's team freed``: in a new thread after ``release_openmp_threads()`` in main
  (the server now). Main runs a parallel op again before each ``thread`` arm, so that arm
  always sees a live team.

Reports the median ms per step and the process's CPU use (100 % = one core) as JSON.

    python threads.py [--rounds 5] [--steps 30] [--out threads.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from distillspec.common.runtime import release_openmp_threads
from distillspec.decoding.engine import Decoder
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.requests import Request
from distillspec.tools.configs import ServeConfig
from distillspec.tools.generate import load_for_decoding


def steps(target, count: int, out: list) -> None:
    """``count`` 16-row plain steps after 2 untimed ones; appends (ms per step, CPU %)."""
    decoder = Decoder(target)
    for row in range(16):
        decoder.add(Request(list(range(100 + row, 148 + row)), count + 8, SamplingConfig(),
                            frozenset(), None, row))
    decoder.step()
    decoder.step()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        decoder.step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out.append((1e3 * wall / count, 100 * cpu / wall))


def in_thread(target, count: int, out: list) -> None:
    thread = threading.Thread(target=steps, args=(target, count, out))
    thread.start()
    thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="threads.json")
    args = parser.parse_args()
    target = load_for_decoding(ServeConfig().target, "none", ServeConfig().runtime, "off", 16)[0]
    results: dict[str, list] = {"main": [], "thread": [], "thread, main's team freed": []}
    for _ in range(args.rounds):
        steps(target, args.steps, results["main"])  # main's team is alive now
        in_thread(target, args.steps, results["thread"])
        released = release_openmp_threads()
        in_thread(target, args.steps, results["thread, main's team freed"])
    summary = {name: {"median_ms_per_step": statistics.median(r[0] for r in runs),
                      "median_cpu_percent": statistics.median(r[1] for r in runs),
                      "runs": runs} for name, runs in results.items()}
    record = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), "dtype": str(target.dtype),
              "released": released, "rounds": args.rounds, "steps": args.steps, "arms": summary}
    with open(args.out, "w") as handle:
        json.dump(record, handle, indent=1)
    for name, values in summary.items():
        print(f"{name}: {values['median_ms_per_step']:.1f} ms per step, "
              f"CPU {values['median_cpu_percent']:.0f} %")


if __name__ == "__main__":
    main()

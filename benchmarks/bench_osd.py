"""Online distillation on shifted traffic: does the served acceptance rate rise?

Not a test. A draft distilled on chat (the demo's) is served to code traffic (HumanEval
prompts). Three phases, all through the real server and the ``openai`` client, greedy:

1. *before*: a server without online distillation answers the held-out HumanEval prompts;
   acceptance = accepted / drafted tokens from its ``/metrics``.
2. *online*: a server with ``--online-distill`` serves the training HumanEval prompts; a round
   of ``distill`` runs in a separate process on what it served, while clients keep sending
   requests (the swap happens under load); we wait for the round's verdict.
3. *after*: the same server (swapped draft, if the candidate won) answers the held-out prompts
   again; the held-out prompts were never in its buffer.

    python benchmarks/bench_osd.py --draft runs/demo/run/final --out docs/results/osd
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from distillspec.common.config import to_dict
from distillspec.common.io import atomic_write_json
from distillspec.common.runtime import cpu_name
from distillspec.models.loading import load_model
from distillspec.tools.bench_serve import LocalServer, _acceptance, _prompts, drive
from distillspec.tools.configs import BenchServeConfig, ServeConfig


def counters(url: str) -> dict:
    return _acceptance(urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode())


def acceptance_between(first: dict, second: dict) -> float:
    drafted = second["num_draft_tokens_total"] - first.get("num_draft_tokens_total", 0.0)
    accepted = second["num_accepted_tokens_total"] - first.get("num_accepted_tokens_total", 0.0)
    return accepted / drafted if drafted else float("nan")


def measure(url: str, model: str, prompts, tokenizer, max_tokens: int) -> dict:
    start = counters(url)
    row = drive(url, model, prompts, 4, len(prompts), max_tokens, tokenizer)
    return {**row, "acceptance_rate": acceptance_between(start, counters(url))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="builtin:smollm2-135m")
    parser.add_argument("--draft", default="runs/demo/run/final")
    parser.add_argument("--traffic", default="builtin:humaneval")
    parser.add_argument("--heldout", default="builtin:humaneval:heldout")
    parser.add_argument("--requests", type=int, default=64, help="served before the round")
    parser.add_argument("--distill-minutes", type=float, default=3.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/osd-bench"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/osd"))
    args = parser.parse_args(argv)
    if args.work.exists():  # an old buffer or verdict would leak into this measurement
        raise SystemExit(f"{args.work} exists: remove it or pass a new --work folder.")
    _, tokenizer = load_model(args.target, device="cpu")
    traffic = _prompts(BenchServeConfig(prompts=args.traffic), tokenizer)
    heldout = _prompts(BenchServeConfig(prompts=args.heldout), tokenizer)
    plain = ServeConfig(target=args.target, draft=args.draft, port=0, max_batch=8)
    plain = replace(plain, speculation=replace(plain.speculation, gamma=args.gamma))
    report = {"command": "python benchmarks/bench_osd.py " + " ".join(argv or sys.argv[1:]),
              "cpu": cpu_name(), "args": {k: str(v) for k, v in vars(args).items()}}
    with LocalServer(plain) as url:
        model = plain.target
        drive(url, model, heldout[:2], 1, 2, args.max_tokens, tokenizer)  # warm-up
        report["before"] = measure(url, model, heldout, tokenizer, args.max_tokens)
    print(f"before: acceptance {report['before']['acceptance_rate']:.3f}", file=sys.stderr)
    online = replace(plain, online_distill=str(args.work), distill_every=args.requests,
                     distill_minutes=args.distill_minutes, distill_threads=1)
    report["serve_config"] = to_dict(online)
    swaps = args.work / "swaps.jsonl"
    with LocalServer(online) as url:
        report["traffic"] = drive(url, model, traffic, 4, args.requests, args.max_tokens,
                                  tokenizer)
        # Keep clients busy while the round trains, so a swap happens under load.
        failures, served, started = [], [0], time.perf_counter()
        stop = threading.Event()

        def keep_sending() -> None:
            while not stop.is_set():
                try:
                    drive(url, model, traffic[served[0] % len(traffic):][:2] or traffic[:2], 2, 2,
                          args.max_tokens, tokenizer)
                    served[0] += 2
                except Exception as error:  # noqa: BLE001 - counted and reported, not hidden
                    failures.append(repr(error))

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        deadline = time.time() + 60 * (args.distill_minutes + 6)
        while time.time() < deadline and not (swaps.is_file() and swaps.read_text().strip()):
            time.sleep(5)
        stop.set()
        sender.join(timeout=600)
        report["round"] = ([json.loads(line) for line in swaps.read_text().splitlines()]
                           if swaps.is_file() else "no verdict before the deadline")
        report["under_load"] = {"requests": served[0], "failures": failures,
                                "seconds": time.perf_counter() - started}
        report["after"] = measure(url, model, heldout, tokenizer, args.max_tokens)
    print(f"after: acceptance {report['after']['acceptance_rate']:.3f}; round: {report['round']}",
          file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "osd.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

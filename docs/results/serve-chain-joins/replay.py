"""Do rows joining a drafting step pay less now? A same-run A/B of the server's engine loop.

``../serve-defer/replay.py``'s closed loop (the server's ``EngineWorker._admit`` and ``_step``,
no HTTP: ``concurrency`` clients each send their next greedy 48-token request, the chat
held-out prompts with the chat template, as soon as their last one ends, ``count`` requests
per level), for three workers sharing the loaded models: the target alone; the SD server as
now (rows joining a chain step read their prompts in its verify pass, and a step that admits
rows where the policy chose the tree runs a chain of the tree's depth); and the SD server as
before (joining rows read their prompts in the step's pass on plain steps only, a prefill pass
of their own on drafting steps). One warm-up level each, then ``rounds`` timed levels in
alternating order.

    python replay.py [--concurrency 4] [--count 64] [--rounds 4] [--out replay.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "serve-defer"), str(HERE.parent / "serve-anatomy")]
import replay as defer_replay  # noqa: E402  (its closed-loop level)
from anatomy import setup  # noqa: E402  (the server's default pair, setting and prompts)

from distillspec.tools.serve_engine import EngineWorker  # noqa: E402

MODES = ("target", "sd-chain-joins", "sd-before")


def before(worker: EngineWorker) -> None:
    """The SD worker as it was: ragged joins on plain steps only, the tree on admitting steps."""
    decoder = worker.decoder

    def joins_ragged(self) -> bool:
        plain = self.draft is None or self.lookahead_limit == 0
        return plain and self.chain_reads_joins()

    decoder._joins_ragged = types.MethodType(joins_ragged, decoder)
    worker._arm = lambda batch, admitting=False: EngineWorker._arm(worker, batch, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="replay.json")
    args = parser.parse_args()
    (target, draft), speculation, stop, prompts, spec = setup("none")
    workers, steps = {}, {mode: [] for mode in MODES}
    for mode in MODES:
        sd = mode != "target"
        workers[mode] = defer_replay.server_worker(target, draft if sd else None, speculation,
                                                   args.concurrency)
        if mode == "sd-before":
            before(workers[mode])
        defer_replay.level(workers[mode], prompts, stop, args.concurrency, args.count, [])
    rates = defer_replay.alternating_levels(workers, prompts, stop, args, steps)
    summary = defer_replay.summarise(rates, steps)
    for mode in MODES:
        if mode != "target":
            by_round = [a / b for a, b in zip(rates[mode], rates["target"])]
            summary[mode]["ratio_to_target_by_round"] = by_round
            summary[mode]["median_ratio_to_target"] = statistics.median(by_round)
    new, old = summary["sd-chain-joins"], summary["sd-before"]
    new["ratio_to_before_by_round"] = [a / b for a, b in zip(new["tokens_per_s"],
                                                              old["tokens_per_s"])]
    new["median_ratio_to_before"] = statistics.median(new["ratio_to_before_by_round"])
    for mode, record in summary.items():
        print(mode, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in record.items()
                     if not isinstance(v, list)})
    defer_replay.write(args.out, {"concurrency": args.concurrency, "count": args.count,
                                  "rounds": args.rounds, "setting": spec, "levels": summary})


if __name__ == "__main__":
    main()

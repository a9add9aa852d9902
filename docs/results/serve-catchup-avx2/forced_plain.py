"""The SD engine forced to plain decoding on every step against the engine without a draft, the
server's loop in one process (``../serve-anatomy/anatomy.py``'s levels: 32 requests of 48 tokens
at 4 and 16 clients, the demo's int8 draft), 3 rounds, order alternating; kernel choices warmed
first as the server does. What it isolates: the cost of having a draft when no step drafts (its
prompt prefill at each admission).

    python forced_plain.py > forced_plain.txt
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve-anatomy"))

from anatomy import level, setup  # noqa: E402

from distillspec.decoding.mode_policy import PLAIN  # noqa: E402
from distillspec.decoding.packed_linear import warm_choices  # noqa: E402


class AlwaysPlain:
    """A policy that never drafts (the server's policy interface)."""

    def choose(self, batch: int) -> int:
        return PLAIN

    def record(self, *step) -> None:
        pass


def main() -> None:
    models, speculation, stop, prompts, _ = setup("int8")
    for model in models:
        warm_choices(model)
    rates: dict = {}
    for round_index in range(3):
        for clients in (4, 16):
            order = ["plain", "forced"] if round_index % 2 == 0 else ["forced", "plain"]
            for mode in order:
                log: list = []
                engine_mode = "plain" if mode == "plain" else "auto"
                rate = level(models, speculation, stop, prompts, engine_mode, clients, 32,
                             AlwaysPlain() if mode == "forced" else None, log)
                rates.setdefault((clients, mode), []).append(rate)
                decoding = [s for s in log if not s["admitting"]]
                admitting = [s for s in log if s["admitting"]]
                print(f"round {round_index} clients {clients} {mode}: {rate:.1f} tok/s; "
                      f"{len(decoding)} decoding steps {sum(s['seconds'] for s in decoding):.2f} s; "
                      f"{len(admitting)} admitting {sum(s['seconds'] for s in admitting):.2f} s",
                      flush=True)
    for clients in (4, 16):
        plain = statistics.median(rates[(clients, "plain")])
        forced = statistics.median(rates[(clients, "forced")])
        print(f"{clients} clients: median plain {plain:.1f}, forced plain {forced:.1f} tok/s, "
              f"ratio {forced / plain:.3f}")


if __name__ == "__main__":
    main()

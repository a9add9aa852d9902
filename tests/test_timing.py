"""Timing helpers (decoding/timing.py): the alternating rounds behind every side-by-side A/B."""

from __future__ import annotations

from distillspec.decoding import timing
from distillspec.decoding.timing import alternating_rates


def test_alternating_rates_warms_up_alternates_and_divides_by_the_seconds(monkeypatch):
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))  # each call: 1 s
    order = []

    def call(name: str, units: float):
        def run() -> float:
            order.append(name)
            return units
        return run

    seen = []
    rates = alternating_rates({"a": call("a", 4.0), "b": call("b", 6.0)}, 3,
                              on_round=lambda index, so_far: seen.append(index))
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then ab / ba / ab
    assert rates == {"a": [4.0] * 3, "b": [6.0] * 3} and seen == [0, 1, 2]
    order.clear()
    assert alternating_rates({"a": call("a", 1.0)}, 2, warmup=False) == {"a": [1.0, 1.0]}
    assert order == ["a", "a"]
    assert alternating_rates({"a": call("a", 1.0)}, 0, warmup=False) == {"a": []}


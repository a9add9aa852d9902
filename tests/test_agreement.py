"""The greedy agreement figure bench and the demo report (SD = plain): hand-made sequences,
and a real sweep in float32, where greedy SD is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from distillspec.decoding.measure import SpeedProbe
from distillspec.decoding.metrics import describe_agreement
from distillspec.decoding.quality import agreement


def test_agreement_says_where_the_differing_rows_first_differ():
    references = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9], [1]]
    outputs = [[1, 2, 3, 4], [5, 6, 0, 8], [9, 0], [1]]
    result = agreement(outputs, references)
    assert result.rows == 4 and result.exact_match == 0.5
    assert result.first_difference_where_different == (2 + 1) / 2
    assert result.mean_first_difference == (4 + 2 + 1 + 1) / 4
    assert agreement([[1]], [[1]]).first_difference_where_different is None
    assert agreement([[1, 2]], [[1, 2, 3]]).first_difference_where_different == 2  # a prefix
    assert describe_agreement(result.to_dict()) == "50% (first difference at 1.5)"
    assert describe_agreement(agreement([[1]], [[1]]).to_dict()) == "100%"
    assert describe_agreement(None) == "–"


def test_a_greedy_sweep_in_float32_reports_full_agreement_and_sampling_none():
    torch.manual_seed(0)
    target, draft = tiny_model(seed=1).eval(), tiny_model(seed=2, layers=1).eval()
    prompts = [[1, 5, 9], [2, 7, 3, 4], [6, 6]]
    greedy = SpeedProbe(target, prompts, max_new_tokens=12, batch_size=2)
    sweep = greedy.sweep(draft, [(1, 0.0), (3, 0.0), (1, 0.0, "4:1")], repeats=1)
    for row in sweep.rows:
        assert row.agreement["rows"] == 3 and row.agreement["exact_match"] == 1.0
        assert row.agreement["first_difference_where_different"] is None
    sampled = SpeedProbe(target, prompts, max_new_tokens=6, temperature=1.0)
    assert sampled.sweep(draft, [(2, 0.0)], repeats=1).rows[0].agreement is None


def test_sweep_rotates_its_order_per_round_and_reports_the_speedup_of_each_round(monkeypatch):
    """Round r runs the methods (the target alone, then each setting) rotated by r, and a
    setting's speed-up in round r is its tokens/s there over the target alone's there."""
    from distillspec.decoding import measure

    torch.manual_seed(0)
    target, draft = tiny_model(seed=1).eval(), tiny_model(seed=2, layers=1).eval()
    probe = SpeedProbe(target, [[1, 5, 9], [2, 7]], max_new_tokens=6, batch_size=2)
    order, timed = [], measure.timed

    def scripted(fn, *args, device=None):
        _, result = timed(fn, *args, device=device)
        order.append("plain" if fn == probe.plain else f"gamma{args[1]}")
        return 1.0 + len(order), result  # every call 1 s slower than the one before

    monkeypatch.setattr(measure, "timed", scripted)
    sweep = probe.sweep(draft, [(1, 0.0), (2, 0.0)], repeats=3)
    assert order == ["plain", "gamma1", "gamma2", "gamma1", "gamma2", "plain",
                     "gamma2", "plain", "gamma1"]
    walls = dict(plain=[2.0, 7.0, 9.0], gamma1=[3.0, 5.0, 10.0], gamma2=[4.0, 6.0, 8.0])
    assert sweep.plain_wall_s == walls["plain"]
    for row, name in zip(sweep.rows, ("gamma1", "gamma2")):
        assert row.repeats_wall_s == walls[name]
        expected = [p / w for p, w in zip(walls["plain"], walls[name])]  # same tokens each
        assert row.speedup_rounds == pytest.approx(expected)
        assert row.speedup_round_median == pytest.approx(sorted(expected)[1])
        assert row.speedup == pytest.approx(7.0 / sorted(walls[name])[1])


def test_round_speedups_divide_tokens_per_second_within_each_round():
    """(tokens / wall_r) / (plain tokens / plain wall_r), here with different token counts."""
    from distillspec.decoding.measure import round_speedups

    ratios = round_speedups([2.0, 4.0], 30, [3.0, 2.0], 20)
    assert ratios == pytest.approx([(30 / 2.0) / (20 / 3.0), (30 / 4.0) / (20 / 2.0)])

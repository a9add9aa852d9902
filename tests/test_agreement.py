"""The greedy agreement figure bench and the demo report (SD = plain): hand-made sequences,
and a real sweep in float32, where greedy SD is exact."""

from __future__ import annotations

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

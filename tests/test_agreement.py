"""The greedy agreement metric: hand-made sequences, and a real sweep in float32 (exact)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from distillspec.decoding.measure import SpeedProbe
from distillspec.decoding.metrics import agreement, describe_agreement, first_difference


def test_first_difference_on_hand_made_sequences():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2, 3], [7, 2, 3]) == 0
    assert first_difference([1, 2, 3], [1, 2]) == 2  # a prefix differs where it ends
    assert first_difference([], [4]) == 0


def test_agreement_counts_rows_and_averages_first_differences():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9], [1]]
    candidate = [[1, 2, 3, 4], [5, 6, 0, 8], [9, 0], [1]]
    result = agreement(reference, candidate)
    assert result.rows == 4 and result.rows_identical == 0.5
    assert result.first_difference == (2 + 1) / 2
    assert agreement([[1]], [[1]]).first_difference is None
    assert describe_agreement(result.to_dict()) == "50% (first difference at 1.5)"
    assert describe_agreement(None) == "–"
    with pytest.raises(ValueError, match="same rows"):
        agreement([[1]], [[1], [2]])


def test_a_greedy_sweep_in_float32_reports_full_agreement_and_sampling_none():
    torch.manual_seed(0)
    target, draft = tiny_model(seed=1).eval(), tiny_model(seed=2, layers=1).eval()
    prompts = [[1, 5, 9], [2, 7, 3, 4], [6, 6]]
    greedy = SpeedProbe(target, prompts, max_new_tokens=12, batch_size=2)
    sweep = greedy.sweep(draft, [(1, 0.0), (3, 0.0), (1, 0.0, "4:1")], repeats=1)
    for row in sweep.rows:
        assert row.agreement == {"rows": 3, "rows_identical": 1.0, "first_difference": None}
    sampled = SpeedProbe(target, prompts, max_new_tokens=6, temperature=1.0)
    assert sampled.sweep(draft, [(2, 0.0)], repeats=1).rows[0].agreement is None

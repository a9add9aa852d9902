"""ModePolicy: which draft length a server step runs, from measured tokens per second."""

from __future__ import annotations

import pytest

from distillspec.decoding.mode_policy import PLAIN, ModePolicy, arm_name, bucket


def test_buckets_are_powers_of_two():
    assert [bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]
    with pytest.raises(ValueError):
        bucket(0)


def test_arms_for_a_chain_and_a_tree():
    assert ModePolicy.for_speculation(4, tree=False).arms == [None, 1, PLAIN]
    assert ModePolicy.for_speculation(1, tree=False).arms == [None, PLAIN]
    assert ModePolicy.for_speculation(1, tree=True).arms == [None, 1, PLAIN]
    assert [arm_name(a) for a in (None, 1, 3, PLAIN)] == ["speculate", "gamma1", "gamma3", "plain"]


def run(policy, batch, rates, steps):
    """``steps`` steps at ``batch``: each arm emits at its rate in ``rates`` (tokens/s, 1 s per
    step); the arms chosen, in order."""
    chosen = []
    for _ in range(steps):
        arm = policy.choose(batch)
        policy.record(batch, arm, rates[arm], 1.0)
        chosen.append(arm)
    return chosen


def test_every_arm_is_measured_then_the_fastest_runs_with_periodic_re_measurement():
    policy = ModePolicy([None, 1, PLAIN], warmup=2, explore_every=8)
    chosen = run(policy, 16, {None: 50.0, 1: 60.0, PLAIN: 80.0}, 40)
    assert chosen[:6] == [None, None, 1, 1, PLAIN, PLAIN]  # the configured arm first
    later = chosen[6:]
    # Every 8th recorded step re-measures the arm measured longest ago; the rest run plain.
    steps = [i + 7 for i, arm in enumerate(later) if arm != PLAIN]  # 1-based step numbers
    assert steps == [8, 16, 24, 32, 40]
    assert [later[s - 7] for s in steps] == [None, 1, None, 1, None]  # oldest estimate first
    # Buckets are separate: at batch 1 speculation is faster and wins there.
    assert run(policy, 1, {None: 30.0, 1: 25.0, PLAIN: 20.0}, 20)[6:].count(None) >= 12
    assert policy.estimates()[(16, "plain")] == pytest.approx(80.0)


def test_a_stale_estimate_is_replaced_when_re_measured():
    policy = ModePolicy([None, PLAIN], warmup=1, explore_every=4, smoothing=1.0)
    run(policy, 4, {None: 10.0, PLAIN: 20.0}, 6)
    # The draft got better: the periodic re-measurement of "speculate" finds it and switches.
    chosen = run(policy, 4, {None: 40.0, PLAIN: 20.0}, 12)
    assert chosen[-8:].count(None) == 6  # plain only at the 2 re-measurements (1 step in 4)


def test_a_new_draft_is_measured_afresh_and_plain_is_kept():
    policy = ModePolicy([None, 1, PLAIN], warmup=1)
    run(policy, 2, {None: 10.0, 1: 12.0, PLAIN: 30.0}, 5)
    policy.forget_speculative()
    assert set(policy.estimates()) == {(2, "plain")}
    assert run(policy, 2, {None: 50.0, 1: 12.0, PLAIN: 30.0}, 3) == [None, 1, None]


def test_bad_settings_and_unknown_arms():
    with pytest.raises(ValueError, match="distinct"):
        ModePolicy([None, None])
    with pytest.raises(ValueError, match="smoothing"):
        ModePolicy([None, PLAIN], smoothing=0.0)
    policy = ModePolicy([None, PLAIN])
    policy.record(1, 5, 10, 1.0)  # not an arm of this policy
    policy.record(1, None, 10, 0.0)  # no time measured
    assert policy.estimates() == {}

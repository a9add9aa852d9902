"""Sharded training (FSDP2 over 2 CPU processes, gloo), of the draft and of the frozen target,
against unsharded runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _cli, final_weights, recipe, workspace  # noqa: F401  (fixture)

from distillspec.training.checkpoint import POINTER
from distillspec.training.loop import distill

TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")

# 2 decoder layers, so FSDP has two layer units besides the root; 6 steps of fixed data, whose
# global batch (8) is the same for 1 process x 8 and 2 processes x 4; the target's top-16 is
# cached first (on 2 processes, each scores a share of it).
COMMON = dict(draft_init="target-layers:2", policy="fixed", max_steps=6, eval_tau_prompts=0,
              eval_every=3, keep_checkpoints=3, teacher_topk=16)


def _torchrun(config, path: Path, port: int, timeout: int = 600) -> None:
    """``distill`` on 2 processes; a hang (a collective one process never joins) fails the test
    at ``timeout`` seconds instead of stalling the suite."""
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port),
               *_cli(config, path)[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def _held(run: Path, key: str) -> list[int]:
    """What each of a run's processes held at the end (``rank-<r>.json``)."""
    return [json.loads(path.read_text())[key] for path in sorted(run.glob("rank-*.json"))]


def _records(run: Path, kind: str) -> list[dict]:
    """The run's step records (kind "step") or evaluation records (kind "eval"), timings dropped."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    chosen = [r for r in lines if ("eval" in r) == (kind == "eval")]
    return [{k: v for k, v in r.items() if "seconds" not in k and not k.startswith("time_")}
            for r in chosen]


def _assert_same_weights(actual: Path, expected: Path) -> None:
    expected_weights, actual_weights = final_weights(expected), final_weights(actual)
    assert expected_weights.keys() == actual_weights.keys()
    for name in expected_weights:
        # Float tolerance: the processes run 1 thread, the reference 2 (other summation orders,
        # also in the cached top-k), and AdamW's g / sqrt(v) turns an ulp on a near-zero
        # gradient into up to lr (1e-3) of weight; seen: 2.4e-5 at most. A wrong shard or a
        # missed gradient sync moves weights by ~lr at every step.
        torch.testing.assert_close(actual_weights[name], expected_weights[name],
                                   atol=1e-4, rtol=1e-4, msg=name)


def test_fsdp_on_two_processes_equals_one_process_and_resumes_on_one(workspace):  # noqa: F811
    reference = workspace / "shard-ref"
    distill(recipe(workspace, output_dir=str(reference), batch_size=8, save_every=3, **COMMON))

    sharded = workspace / "shard-fsdp"
    config = recipe(workspace, output_dir=str(sharded), batch_size=4, save_every=3,
                    sharding="fsdp", **COMMON)
    _torchrun(config, workspace / "shard-fsdp.yaml", port=29531)
    _assert_same_weights(sharded, reference)
    whole = json.loads((reference / "rank-0.json").read_text())["trainable_held"]
    held = [json.loads((sharded / f"rank-{r}.json").read_text())["trainable_held"] for r in (0, 1)]
    assert sum(held) == whole and max(held) < 0.6 * whole  # each process held about half
    # The checkpoints are whole: the 2-process step-3 checkpoint resumes on 1 unsharded process.
    resumed = workspace / "shard-resumed"
    shutil.copytree(sharded, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    (resumed / "checkpoints" / POINTER).write_text("step-000003\n")
    distill(recipe(workspace, output_dir=str(resumed), batch_size=8, save_every=3, resume=True,
                   **COMMON))
    _assert_same_weights(resumed, reference)


def test_fsdp_without_a_process_group_says_how_to_launch(workspace):  # noqa: F811
    config = recipe(workspace, output_dir=str(workspace / "shard-alone"), sharding="fsdp",
                    **COMMON)
    with pytest.raises(ValueError, match="torchrun"):
        distill(config)


# Live target forwards on 2 processes, the draft sharded in both runs, the target in one: a mixed
# policy (with seed 0 steps 1-2 sample the teacher through the gathered target, steps 3-4 the
# draft), every batch scored by the target inside the step; a pruned head (:vocab=48), so the step
# runs the target's restricted head, sharded with the rest; tau measured through the engine at
# the start, at step 2 and at the end (rank 0 alone runs the target then).
LIVE = dict(draft_init="target-layers:2:vocab=48", policy="mixed", mix="draft=0.5,teacher=0.5",
            max_steps=4, batch_size=4, eval_every=2, eval_tau_prompts=2, sharding="fsdp")


def test_sharded_target_trains_exactly_as_a_whole_one(workspace):  # noqa: F811
    whole = workspace / "target-whole"
    _torchrun(recipe(workspace, output_dir=str(whole), **LIVE), workspace / "target-whole.yaml",
              port=29533, timeout=300)
    sharded = workspace / "target-fsdp"
    _torchrun(recipe(workspace, output_dir=str(sharded), target_sharding="fsdp", **LIVE),
              workspace / "target-fsdp.yaml", port=29534, timeout=300)
    # Exact: the gathered weights are the shards' bytes, and both runs compute the same forwards
    # in the same order on the same thread counts; any wrong or stale shard changes the logits.
    expected, actual = final_weights(whole), final_weights(sharded)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    steps, evaluations = _records(sharded, "step"), _records(sharded, "eval")
    assert steps == _records(whole, "step") and evaluations == _records(whole, "eval")
    assert {r["policy"] for r in steps} == {"teacher", "draft"}
    assert [r["eval"] for r in evaluations] == ["start", "periodic", "final"]
    assert all(r["tau"] >= 1.0 for r in evaluations)
    # Each process held about half of the target at the end (whole in the unsharded run), so a
    # target silently left whole, or left gathered after an evaluation, fails here.
    total = _held(whole, "target_held")
    held = _held(sharded, "target_held")
    assert total[0] == total[1] and sum(held) == total[0] and max(held) < 0.6 * total[0]


def test_sharded_target_with_a_data_parallel_draft_equals_one_process(workspace):  # noqa: F811
    # Fixed data scored live by the target every step (no top-k cache), the draft data-parallel
    # (sharding none) and the target sharded; 2 processes x batch 4 against 1 x batch 8.
    common = dict(COMMON, teacher_topk=0, eval_tau_prompts=2, save_every=0)
    reference = workspace / "target-ref"
    distill(recipe(workspace, output_dir=str(reference), batch_size=8, **common))
    sharded = workspace / "target-ddp"
    _torchrun(recipe(workspace, output_dir=str(sharded), batch_size=4, target_sharding="fsdp",
                     **common), workspace / "target-ddp.yaml", port=29535, timeout=300)
    _assert_same_weights(sharded, reference)
    held, total = _held(sharded, "target_held"), _held(reference, "target_held")[0]
    assert sum(held) == total and max(held) < 0.6 * total
    whole_draft = _held(reference, "trainable_held")[0]
    assert _held(sharded, "trainable_held") == [whole_draft, whole_draft]  # DDP: whole on each


def test_target_sharding_refuses_a_given_target_and_a_lone_process(workspace):  # noqa: F811
    config = recipe(workspace, output_dir=str(workspace / "target-alone"),
                    target_sharding="fsdp", **COMMON)
    with pytest.raises(ValueError, match="shards the target in place"):
        distill(config, target=object(), tokenizer=object())
    with pytest.raises(ValueError, match="torchrun"):
        distill(config)

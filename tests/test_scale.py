"""Teacher data on several ranks: shards dealt over ranks, merged in order, resumable per shard.

Ranks are threads here (a barrier between them, one tiny model) for the properties, and real
processes (torchrun, gloo) for the launch: ``datagen`` and the top-k cache on 2 ranks equal a
1-rank run byte for byte, and a killed job redoes only its unfinished shards.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from sharded_topk import BATCH, SHARD_BATCHES, K, topk_inputs

from distillspec.tools.cli import main
from distillspec.training import datagen as datagen_module
from distillspec.training import teacher_topk
from distillspec.training.datagen import datagen, datagen_sharded, parts_folder
from distillspec.training.datasets import PromptExample
from distillspec.training.shards import ONE_RANK, Shards, mine, remove

HERE = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


@dataclass
class ThreadRank:
    """Rank ``process_index`` of a world of threads that meet at one barrier."""

    process_index: int
    num_processes: int
    barrier: threading.Barrier

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=120)


def on_ranks(world: int, job):
    """``job(ranks)`` on ``world`` threads at once; their results in rank order."""
    barrier, results, errors = threading.Barrier(world), [None] * world, []

    def run(index: int) -> None:
        try:
            results[index] = job(ThreadRank(index, world, barrier))
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(autouse=True)
def threads():
    """CLI runs with --threads set torch's thread count for the process: put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def own(model):
    """A rank's own copy of the model (the engine keeps per-model state: ranks never share)."""
    return copy.deepcopy(model)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0, lm_scale=10.0)


def examples(count: int = 7) -> list[PromptExample]:
    return [PromptExample([1] + [4 + (7 * i + j) % 90 for j in range(1 + i % 4)], None,
                          f"p.jsonl:{i + 1}") for i in range(count)]


def generate(target, out: Path, ranks=ONE_RANK, **overrides) -> int:
    values = dict(temperature=1.0, max_new_tokens=6, batch_size=2, eos_token_id=2,
                  generator=torch.Generator().manual_seed(0), job="tiny", shard_prompts=2)
    values.update(overrides)
    return datagen_sharded(target, tiny_tokenizer(), examples(), out, ranks=ranks, **values)


# -- the shard plan --------------------------------------------------------------------------------


def test_unfinished_shards_are_dealt_round_robin_and_finished_ones_kept(tmp_path):
    shards = Shards(tmp_path / "parts", total=9, size=2, suffix="jsonl")
    assert shards.count == 5 and shards.bounds(4) == (8, 9)
    assert mine(shards, "job", ONE_RANK) == ([0, 1, 2, 3, 4], 0)
    shards.write(0, b"a")
    shards.write(2, b"c")
    dealt = on_ranks(2, lambda ranks: mine(shards, "job", ranks))
    assert dealt == [([1, 4], 2), ([3], 2)]
    with pytest.raises(ValueError, match="holds the shards of another job"):
        mine(shards, "other job", ONE_RANK)
    (shards.folder / "notes.txt").write_text("mine")  # not a shard: never removed
    assert mine(shards, "other job", ONE_RANK, replace=True) == ([0, 1, 2, 3, 4], 0)
    remove(shards)
    assert sorted(p.name for p in shards.folder.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="not a shard folder distillspec wrote"):
        mine(shards, "job", ONE_RANK)
    with pytest.raises(ValueError, match="at least one item"):
        Shards(tmp_path, total=3, size=0, suffix="jsonl")


# -- datagen ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_datagen_on_two_ranks_writes_what_one_rank_writes(tmp_path, target, temperature):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert generate(target, one, temperature=temperature) == 7
    counts = on_ranks(2, lambda ranks: generate(own(target), two, ranks, temperature=temperature))
    assert counts == [7, 7]
    assert two.read_bytes() == one.read_bytes()
    assert not parts_folder(one).exists() and not parts_folder(two).exists()
    lines = [json.loads(line) for line in one.read_text().splitlines()]
    assert [r["prompt_ids"] for r in lines] == [e.prompt_ids for e in examples()]
    # A shard is decoded like a whole run: one shard of everything is datagen's single pass.
    whole = tmp_path / "whole.jsonl"
    datagen(target, tiny_tokenizer(), examples(), whole, temperature=temperature,
            max_new_tokens=6, batch_size=2, eos_token_id=2,
            generator=torch.Generator().manual_seed(0))
    assert [json.loads(line)["completion_ids"] for line in whole.read_text().splitlines()] == [
        r["completion_ids"] for r in lines]


def test_a_killed_datagen_redoes_only_its_unfinished_shards(tmp_path, target, monkeypatch):
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    generate(target, reference)
    real, decoded = datagen_module._generate_all, []

    def killed_in_the_third_shard(model, prompts, **kwargs):
        if len(decoded) == 2:
            raise KeyboardInterrupt
        decoded.append(len(prompts))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(datagen_module, "_generate_all", killed_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        generate(target, out)
    assert not out.exists()
    assert sorted(p.name for p in parts_folder(out).iterdir()) == [
        "manifest.json", "shard-000000.jsonl", "shard-000001.jsonl"]
    with pytest.raises(ValueError, match="holds the shards of another job"):
        generate(target, out, temperature=0.0)  # other settings: refused, the shards kept
    decoded.clear()
    monkeypatch.setattr(datagen_module, "_generate_all",
                        lambda model, prompts, **kw: decoded.append(len(prompts)) or real(
                            model, prompts, **kw))
    generate(target, out)
    assert decoded == [2, 1]  # shards 2 and 3 of 0..3, on the rerun
    assert out.read_bytes() == reference.read_bytes()
    assert not parts_folder(out).exists()


# -- the top-k cache -------------------------------------------------------------------------------


def build(target, path: Path, ranks=ONE_RANK):
    found, completions = topk_inputs()
    return teacher_topk.build(target, found, completions, K, path, batch_size=BATCH,
                              shard_batches=SHARD_BATCHES, ranks=ranks)


def assert_same_topk(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for source, (ids, logp) in expected.items():
        assert torch.equal(actual[source][0], ids) and torch.equal(actual[source][1], logp)


def test_topk_on_two_ranks_equals_one_rank_and_an_unsharded_build(tmp_path, target):
    one = build(target, tmp_path / "one.safetensors")
    for result in on_ranks(2, lambda ranks: build(own(target), tmp_path / "two.safetensors", ranks)):
        assert_same_topk(result, one)  # every rank gets the whole cache
    assert load_file(tmp_path / "two.safetensors").keys() == load_file(
        tmp_path / "one.safetensors").keys()
    assert (tmp_path / "two.json").read_text() == (tmp_path / "one.json").read_text()
    assert not (tmp_path / "two.parts").exists()
    found, completions = topk_inputs()
    whole = teacher_topk.build(target, found, completions, K, tmp_path / "whole.safetensors",
                               batch_size=BATCH, shard_batches=100)
    assert_same_topk(whole, one)


def test_a_killed_topk_build_redoes_only_its_unfinished_shards(tmp_path, target, monkeypatch):
    reference = build(target, tmp_path / "reference.safetensors")
    real, scored = teacher_topk._score, []

    def killed_in_the_third_batch(target, chunk, *args):
        if len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(len(chunk))
        return real(target, chunk, *args)

    monkeypatch.setattr(teacher_topk, "_score", killed_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build(target, tmp_path / "cache.safetensors")
    assert len(list((tmp_path / "cache.parts").glob("shard-*"))) == 2
    scored.clear()
    monkeypatch.setattr(teacher_topk, "_score", lambda target, chunk, *args: scored.append(
        len(chunk)) or real(target, chunk, *args))
    assert_same_topk(build(target, tmp_path / "cache.safetensors"), reference)
    assert scored == [2, 1]  # 7 examples in batches of 2: the last two batches only


def test_two_runs_sharing_a_topk_folder_score_it_once(tmp_path, target, monkeypatch):
    real, scored = teacher_topk._score, []
    monkeypatch.setattr(teacher_topk, "_score", lambda target, chunk, *args: scored.append(
        len(chunk)) or real(target, chunk, *args))
    shared = tmp_path / "topk"
    shared.mkdir()
    barrier = threading.Barrier(2)

    def independent_run(ranks):  # two single-rank runs, not two ranks of one
        model = own(target)
        barrier.wait()
        return build(model, shared)

    first, second = on_ranks(2, independent_run)
    assert_same_topk(first, second)
    assert scored == [2, 2, 2, 1]  # one build; the other waited for it and loaded the file
    assert len(list(shared.glob("*.safetensors"))) == 1


# -- real processes: torchrun, gloo ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    save_tiny(root / "target", layers=2, lm_scale=10.0)
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": " ".join(f"w{(5 * i + j) % 90}" for j in range(1 + i % 5))}) + "\n"
        for i in range(11)))
    return root


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_datagen_on_two_processes_writes_what_one_process_writes(workspace):
    def args(out: str) -> list[str]:
        return ["datagen", "--target", str(workspace / "target"), "--data",
                str(workspace / "prompts.jsonl"), "--out", str(workspace / out),
                "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "2",
                "--shard-prompts", "3", "--device", "cpu", "--dtype", "float32", "--threads", "1"]

    assert main(args("one.jsonl")) == 0
    result = torchrun("-m", "distillspec", *args("two.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 ranks)" in result.stderr
    one, two = workspace / "one.jsonl", workspace / "two.jsonl"
    assert two.read_bytes() == one.read_bytes() and len(one.read_text().splitlines()) == 11
    assert not list(workspace.glob("*.parts"))  # the shards were merged and removed


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_topk_on_two_processes_equals_one_process(workspace):
    result = torchrun(str(HERE / "sharded_topk.py"), str(workspace / "target"),
                      str(workspace / "topk.safetensors"))
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(workspace / "target",
                                                  torch_dtype=torch.float32).eval()
    torch.set_num_threads(1)  # as each rank: fp32 sums may round otherwise with other threads
    expected = build(target, workspace / "one-topk.safetensors")
    saved = json.loads((workspace / "topk.json").read_text())
    tensors = load_file(workspace / "topk.safetensors")
    actual = {s: (tensors[f"ids.{i}"], tensors[f"logp.{i}"]) for i, s in
              enumerate(saved["sources"])}
    assert_same_topk(actual, expected)

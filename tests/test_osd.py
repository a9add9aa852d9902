"""Online distillation on a shifted distribution: the served acceptance rate rises after a swap
made under load, no request fails, and a killed trainer leaves the served draft untouched.
Faults (issue 23): a round killed or failing at each point, a full disk, a damaged buffer line:
the served draft stays and every greedy answer equals the target's own."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import save_tiny

from distillspec import autoregressive_generate
from distillspec.common.config import from_dict
from distillspec.models import loading
from distillspec.models.loading import load_model
from distillspec.tools import osd
from distillspec.tools.bench_serve import LocalServer
from distillspec.tools.configs import ServeConfig
from distillspec.tools.osd import OnlineDistiller
from distillspec.training.config import DistillConfig
from distillspec.training.loop import distill

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow


def domain(low: int, high: int, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(low, high)}" for _ in range(rng.randrange(3, 7)))
            for _ in range(count)]


def counters(url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("num_draft_tokens_total", "num_accepted_tokens_total"):
            if line.startswith(f"distillspec_spec_decode_{name} "):
                values[name] = float(line.split()[-1])
    return values["num_draft_tokens_total"], values["num_accepted_tokens_total"]


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/health").read())


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A target, and a 1-layer draft distilled on domain A (words w4..w44) only."""
    root = tmp_path_factory.mktemp("osd")
    save_tiny(root / "target", layers=3, lm_scale=10.0)
    with (root / "a.jsonl").open("w") as handle:
        for prompt in domain(4, 44, 64, seed=0):
            handle.write(json.dumps({"prompt": prompt}) + "\n")
    distill(from_dict(DistillConfig, dict(
        target=str(root / "target"), draft_init="target-layers:1", data=str(root / "a.jsonl"),
        policy="teacher", sample_temperature=0.0, max_steps=40, batch_size=8,
        max_new_tokens=8, lr=2e-3, warmup_steps=2, eval_every=0, save_every=0, eval_prompts=4,
        eval_tau_prompts=0, held_out=4, output_dir=str(root / "draft-a"),
        runtime={"device": "cpu"}, bf16="off")))
    return root


def serve_config(root, folder, **overrides) -> ServeConfig:
    # sd_policy always: these tests compare the served acceptance rate before and after a swap,
    # which only means the same thing at one draft length (auto would mix gamma 4, 1 and plain
    # steps differently in each phase, by timing).
    values = dict(
        target=str(root / "target"), draft=str(root / "draft-a" / "final"), port=0,
        model_name="tiny", max_batch=8, online_distill=str(folder), distill_every=24,
        distill_minutes=0.15, buffer_size=400, speculation={"gamma": 4}, sd_policy="always",
        runtime={"device": "cpu", "dtype": "float32"})
    return from_dict(ServeConfig, {**values, **overrides})


def test_served_acceptance_rises_after_an_online_swap_under_load(shifted, tmp_path):
    local = LocalServer(serve_config(shifted, tmp_path / "osd"))
    url = local.__enter__()
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    traffic = domain(50, 92, 400, seed=1)  # domain B: the draft never saw it
    failures, done = [], threading.Event()

    def user(offset: int) -> None:
        index = offset
        while not done.is_set():
            try:
                client.completions.create(model="tiny", prompt=traffic[index % len(traffic)],
                                          max_tokens=8, temperature=0)
            except Exception as error:  # noqa: BLE001 - every failure is reported below
                failures.append(error)
            index += 3

    try:
        users = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(3)]
        for thread in users:
            thread.start()
        time.sleep(3)
        before = counters(url)
        deadline = time.time() + 240
        while health(url)["draft_version"] == 0 and time.time() < deadline:
            time.sleep(0.5)
        swapped = counters(url)
        time.sleep(6)  # traffic served by the new draft
        after = counters(url)
        done.set()
        for thread in users:
            thread.join(timeout=60)
    finally:
        local.__exit__(None, None, None)
    assert health_version(tmp_path / "osd") >= 1, "no swap happened"
    assert failures == []
    rate_before = before[1] / before[0]
    rate_after = (after[1] - swapped[1]) / max(after[0] - swapped[0], 1)
    assert rate_after > rate_before + 0.05, (rate_before, rate_after)
    swaps = [json.loads(line) for line in (tmp_path / "osd" / "swaps.jsonl").read_text().splitlines()]
    # A round may lose on the small held-back slice (kept, not swapped); every swap must win.
    assert [s["round"] for s in swaps] == list(range(1, len(swaps) + 1))  # each round numbered
    assert all(s["candidate_alpha"] > s["current_alpha"] for s in swaps if s["swap"])


def health_version(folder) -> int:
    swaps = [json.loads(line) for line in (folder / "swaps.jsonl").read_text().splitlines()]
    return sum(1 for s in swaps if s.get("swap"))


def test_a_killed_trainer_leaves_the_served_draft_untouched(shifted, tmp_path):
    local = LocalServer(serve_config(shifted, tmp_path / "osd", distill_minutes=2.0))
    url = local.__enter__()
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    distiller = local.server.distiller
    try:
        for prompt in domain(50, 92, 40, seed=2):
            client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        deadline = time.time() + 60
        while distiller.process is None and time.time() < deadline:
            time.sleep(0.1)
        assert distiller.process is not None, "a round should have started"
        time.sleep(3)  # mid-run
        distiller.process.kill()
        while distiller.process is not None and time.time() < deadline + 60:
            time.sleep(0.1)
        reply = client.completions.create(model="tiny", prompt="w60 w61", max_tokens=4,
                                          temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert health(url)["draft_version"] == 0
    finally:
        local.__exit__(None, None, None)
    record = json.loads((tmp_path / "osd" / "swaps.jsonl").read_text().splitlines()[-1])
    assert record["swap"] is False and "exited" in record["why"]


# -- faults: a round killed at any point, a damaged buffer, a full disk ----------------------------
# Each runs real rounds of a tiny model with users sending greedy requests throughout: the served
# draft stays, and every answer equals the target's own greedy output (float32).

ANSWER_TOKENS = 8
PROMPTS = [f"w{50 + i} w{60 + (7 * i) % 30} w{4 + 3 * i}" for i in range(12)]
ROUND_SECONDS = 300  # a round (trainer start, 3 s of training, two evaluations) ends within this
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

# Loaded by the trainer processes of a test (PYTHONPATH): the fault named by OSD_TEST_FAULT,
# injected into the real trainer, noted in OSD_TEST_MARKER when it fires.
CHILD_FAULTS = '''
import errno, os, signal

fault = os.environ.get("OSD_TEST_FAULT")


def fire():
    with open(os.environ["OSD_TEST_MARKER"], "a") as marker:
        marker.write(fault + "\\n")
    if fault.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


if fault:
    from distillspec.training import checkpoint, loop

    if fault == "kill-training":  # at the third optimiser step
        one_step, steps = loop._one_step, []

        def counted(run):
            steps.append(1)
            if len(steps) == 3:
                fire()
            return one_step(run)

        loop._one_step = counted
    else:  # kill-saving, disk-full-saving: the candidate's weights are written, its manifest not
        write_manifest = checkpoint._write_manifest

        def manifest(folder):
            if folder.name.startswith("final"):  # staged as final.tmp-*
                fire()
            write_manifest(folder)

        checkpoint._write_manifest = manifest
'''


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A target, its greedy answers to PROMPTS, and the trainer's fault injector."""
    root = tmp_path_factory.mktemp("osd-faults")
    save_tiny(root / "target", layers=3, lm_scale=10.0)
    target, tokenizer = load_model(root / "target", device="cpu", dtype="float32")
    expected = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        result = autoregressive_generate(target, ids, max_new_tokens=ANSWER_TOKENS,
                                         eos_token_id=target.generation_config.eos_token_id)
        expected[prompt] = tokenizer.decode(result.sequences[0], skip_special_tokens=True)
    (root / "inject").mkdir()
    (root / "inject" / "sitecustomize.py").write_text(CHILD_FAULTS)
    return root, expected


class Users:
    """Threads sending greedy requests in turn until ``stop()``; every answer is checked."""

    def __init__(self, url: str, expected: dict[str, str], count: int = 2):
        self.client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        self.expected, self.done, self.lock = expected, threading.Event(), threading.Lock()
        self.answered, self.wrong, self.errors = 0, [], []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, offset: int) -> None:
        index = offset
        while not self.done.is_set():
            prompt = PROMPTS[index % len(PROMPTS)]
            try:
                reply = self.client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=ANSWER_TOKENS, temperature=0)
                with self.lock:
                    if reply.choices[0].text != self.expected[prompt]:
                        self.wrong.append((prompt, reply.choices[0].text))
                    self.answered += 1
            except Exception as error:  # noqa: BLE001 - every failure is reported
                self.errors.append(error)
                time.sleep(0.1)
            index += len(self.threads)

    def wait_for(self, answered: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while self.answered < answered:
            assert time.time() < deadline and not self.errors, (self.answered, self.errors)
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop; none failed, every answer was the target's greedy output."""
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self.threads), "a request hung"
        assert self.errors == [] and self.wrong == [] and self.answered > 0


@contextlib.contextmanager
def serving(root, folder, expected, **overrides):
    """An online-distilling server on ``folder`` with ``Users`` sending it requests: yields
    (local server, url, users); the users stop (unchecked) and the server exits at the end."""
    local, url = osd_server(root, folder, **overrides)
    users = Users(url, expected)
    try:
        yield local, url, users
    finally:
        users.done.set()
        local.__exit__(None, None, None)


def osd_server(root, folder, **overrides) -> tuple[LocalServer, str]:
    values = dict(
        target=str(root / "target"), draft="target-layers:1", port=0, model_name="tiny",
        max_batch=8, online_distill=str(folder), distill_every=8, distill_minutes=0.05,
        buffer_size=400, speculation={"gamma": 3}, runtime={"device": "cpu", "dtype": "float32"})
    local = LocalServer(from_dict(ServeConfig, {**values, **overrides}))
    return local, local.__enter__()


def wait_for_rounds(distiller, count: int = 1) -> None:
    """Until ``count`` rounds have ended: their trainers exited and were judged (rounds run one
    at a time, and under steady traffic the next starts as soon as one ends)."""
    deadline = time.time() + ROUND_SECONDS
    while not (distiller.rounds > count or distiller.rounds == count and distiller.process is None):
        assert time.time() < deadline, "the round did not end"
        time.sleep(0.1)


def assert_draft_kept(local, url: str, draft) -> None:
    engine, distiller = local.server.engine, local.server.distiller
    assert health(url)["draft_version"] == 0 and engine.draft_version == 0
    assert engine.models[1] is draft and engine.decoder.draft.model is draft
    assert (distiller.version, distiller.current) == (0, "target-layers:1")


def records(folder) -> list[dict]:
    path = folder / "swaps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def always_better(monkeypatch):
    """A candidate that trained to the end is taken whatever its alpha: every such round goes
    on to the swap, where the faults below strike."""
    judge = OnlineDistiller._judge

    def taken(self, code, out):
        verdict = judge(self, code, out)
        return {**verdict, "swap": "candidate_alpha" in verdict}

    monkeypatch.setattr(OnlineDistiller, "_judge", taken)


def test_control_a_round_swaps_under_load_and_every_answer_stays_exact(faults, tmp_path,
                                                                         always_better):
    """Without a fault the swap happens (so the tests below could fail), and greedy answers
    before, during and after it equal the target's."""
    root, expected = faults
    with serving(root, tmp_path / "osd", expected) as (local, url, users):
        draft = local.server.engine.models[1]
        wait_for_rounds(local.server.distiller)
        users.wait_for(users.answered + 8)
        users.stop()
        assert health(url)["draft_version"] >= 1 and local.server.engine.models[1] is not draft
    assert records(tmp_path / "osd")[0]["swap"] is True


@pytest.mark.parametrize("fault, why", [
    ("kill-training", "trainer exited with -9"),     # SIGKILL at the third step
    ("kill-saving", "trainer exited with -9"),       # SIGKILL while writing the candidate
    ("disk-full-saving", "trainer exited with 2"),   # ENOSPC while writing it (the CLI's error)
])
def test_a_trainer_killed_or_out_of_disk_leaves_the_draft_and_the_answers(
        faults, tmp_path, monkeypatch, always_better, fault, why):
    root, expected = faults
    marker = tmp_path / "fired"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(root / "inject"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("OSD_TEST_FAULT", fault)
    monkeypatch.setenv("OSD_TEST_MARKER", str(marker))
    with serving(root, tmp_path / "osd", expected) as (local, url, users):
        draft = local.server.engine.models[1]
        wait_for_rounds(local.server.distiller)
        users.wait_for(users.answered + 8)  # served after the failed round too
        users.stop()
        assert_draft_kept(local, url, draft)
    assert set(marker.read_text().split()) == {fault}  # the fault struck (in every round)
    record = records(tmp_path / "osd")[0]
    assert record["swap"] is False and record["why"] == why
    assert not list((tmp_path / "osd" / "rounds").glob("*/final"))  # no candidate was saved


@pytest.mark.parametrize("fault", ["log", "load", "swap"])
def test_a_round_that_fails_before_the_swap_leaves_the_draft_and_the_answers(
        faults, tmp_path, monkeypatch, always_better, fault):
    """The candidate is saved and taken; then the disk is full for the swap log, or loading it
    fails, or the engine cannot swap it in."""
    from distillspec.decoding.engine import Decoder

    root, expected = faults
    fired = []

    def fail(*args, **kwargs):
        fired.append(fault)
        raise ENOSPC if fault == "log" else RuntimeError(f"injected {fault} fault")

    if fault == "log":
        monkeypatch.setattr(OnlineDistiller, "_log", fail)
    elif fault == "load":  # the candidate's folder only (not the models the server starts with)
        load = loading.load_model
        monkeypatch.setattr(loading, "load_model", lambda folder, **kwargs: (
            fail() if "rounds" in Path(folder).parts else load(folder, **kwargs)))
    else:
        monkeypatch.setattr(Decoder, "replace_draft", fail)
    with serving(root, tmp_path / "osd", expected) as (local, url, users):
        draft = local.server.engine.models[1]
        wait_for_rounds(local.server.distiller)
        users.wait_for(users.answered + 8)
        users.stop()
        assert fired and set(fired) == {fault}
        assert_draft_kept(local, url, draft)
        assert local.server.engine.alive and health(url)["status"] == "ok"
    assert list((tmp_path / "osd" / "rounds").glob("*/final/manifest.json"))  # it was saved


class FullDisk:
    """Writes to files named ``names`` fail with ENOSPC while ``full`` (appends after writing
    half their text, as a disk that fills mid-write does)."""

    def __init__(self, monkeypatch, *names: str):
        self.full, self.names, self.failed = True, names, 0
        opener, atomic = Path.open, osd.atomic_write_text

        def open_(path, mode="r", *args, **kwargs):
            handle = opener(path, mode, *args, **kwargs)
            if self.full and path.name in self.names and mode.startswith("a"):
                self.failed += 1
                return self._half(handle)
            return handle

        def atomic_write_text(path, text):
            if self.full and Path(path).parent.name in self.names:
                self.failed += 1
                raise ENOSPC
            atomic(path, text)

        monkeypatch.setattr(Path, "open", open_)
        monkeypatch.setattr(osd, "atomic_write_text", atomic_write_text)

    class _half:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text: str) -> int:
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise ENOSPC


def whole_lines(path) -> list[dict]:
    """Every line of a buffer file, each a whole record (a damaged one fails here)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


def test_a_full_disk_for_the_buffer_leaves_no_partial_line_and_every_answer(faults, tmp_path,
                                                                              monkeypatch):
    root, expected = faults
    disk = FullDisk(monkeypatch, "buffer.jsonl", "heldout.jsonl")
    folder = tmp_path / "osd"
    with serving(root, folder, expected) as (local, url, users):
        draft = local.server.engine.models[1]
        deadline = time.time() + 60
        while disk.failed < 24:  # 24 requests answered and not kept
            assert time.time() < deadline and not users.errors, users.errors
            time.sleep(0.05)
        assert local.server.engine.alive
        # Read between two appends (under the buffer's lock): a failed append has undone its
        # half line by then. Without the lock this read could land mid-write.
        with local.server.distiller.lock:
            assert whole_lines(folder / "buffer.jsonl") == whole_lines(folder / "heldout.jsonl") == []
        assert local.server.distiller.rounds == 0
        disk.full = False  # room again: requests are kept from now on
        users.wait_for(users.answered + 8)
        users.stop()
        assert_draft_kept(local, url, draft)
    kept = whole_lines(folder / "buffer.jsonl")
    assert kept and all(line["completion_ids"] for line in kept)


def test_a_full_disk_when_a_round_starts_leaves_every_answer_and_retries(faults, tmp_path,
                                                                          monkeypatch):
    root, expected = faults
    disk = FullDisk(monkeypatch, "recipes")  # the round's recipe cannot be written
    with serving(root, tmp_path / "osd", expected) as (local, url, users):
        distiller, draft = local.server.distiller, local.server.engine.models[1]
        deadline = time.time() + 60
        while disk.failed < 2:  # two rounds could not start (each after 8 new prompts)
            assert time.time() < deadline and local.server.engine.alive
            time.sleep(0.05)
        assert distiller.rounds == 0 and distiller.process is None
        assert_draft_kept(local, url, draft)
        disk.full = False
        while distiller.rounds == 0:  # the next try starts a round
            assert time.time() < deadline + 60
            time.sleep(0.05)
        users.stop()
    assert len(whole_lines(tmp_path / "osd" / "buffer.jsonl")) >= 24


def surviving_cut(before: list, after: list) -> int:
    """How many of ``before``'s oldest lines a bounded file trimmed: ``after`` starts with the
    rest of ``before``, in order. Lines repeat (users resend the same prompts), so every cut is
    tried, not the first equal line."""
    cut = next((cut for cut in range(len(before) + 1)
                if after[: len(before) - cut] == before[cut:]), None)
    assert cut is not None, "the earlier lines did not survive in order"
    return cut


def test_a_damaged_buffer_line_from_a_killed_run_is_dropped_and_rounds_still_train(
        faults, tmp_path):
    """A run killed mid-append leaves a cut line (and a disk error can leave junk): the next
    run drops such lines before appending, so its trainer, which refuses them, can read the
    buffer; served answers are unaffected throughout."""
    root, expected = faults
    folder = tmp_path / "osd"
    with serving(root, folder, expected, distill_every=1000) as (_, _, users):  # no round
        users.wait_for(24)
        users.stop()
    good = whole_lines(folder / "buffer.jsonl")
    with (folder / "buffer.jsonl").open("ab") as handle:
        handle.write(b'{"prompt_ids": [1, 54, 64], "completion_ids": [7, \x00\xff junk\n')
        handle.write(b'{"prompt_ids": [1, 55, 71], "completion_ids": [9, 1')  # cut mid-line
    heldout = whole_lines(folder / "heldout.jsonl")
    with (folder / "heldout.jsonl").open("ab") as handle:
        handle.write(b'{"prompt_ids": [1, 56, 72], "compl')
    with serving(root, folder, expected) as (local, _, users):
        wait_for_rounds(local.server.distiller)
        users.stop()
    # every line whole (the damaged ones were dropped); the earlier lines stay in order and new
    # ones follow, though on a slow machine so many requests come before the round that each
    # file's bound (buffer 400, held-out 16) trims its oldest lines
    kept = whole_lines(folder / "buffer.jsonl")
    cut = surviving_cut(good, kept)
    assert len(kept) > len(good) - cut and (cut == 0 or len(kept) >= 400), (cut, len(kept))
    now = whole_lines(folder / "heldout.jsonl")
    cut = surviving_cut(heldout, now)
    assert cut == 0 or len(now) >= 16, (cut, len(now))
    record = records(folder)[0]
    assert "candidate_alpha" in record, record  # the trainer read the buffer and finished

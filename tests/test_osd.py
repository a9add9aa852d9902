"""Online distillation on a shifted distribution: the served acceptance rate rises after a swap
made under load, no request fails, and a killed trainer leaves the served draft untouched."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request

import pytest
from conftest import save_tiny

from distillspec.common.config import from_dict
from distillspec.tools.bench_serve import LocalServer
from distillspec.tools.configs import ServeConfig
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
    values = dict(
        target=str(root / "target"), draft=str(root / "draft-a" / "final"), port=0,
        model_name="tiny", max_batch=8, online_distill=str(folder), distill_every=24,
        distill_minutes=0.15, buffer_size=400, speculation={"gamma": 4},
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

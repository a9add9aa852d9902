"""The server under load (issue 23): 200 requests at concurrency 16 with mixed lengths,
temperatures, stop strings and streaming, through the openai client: none fails, resident
memory stays flat after a warm-up, and p99 latency is reported. Bounded: a tiny model, seconds
to a minute."""

from __future__ import annotations

import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import save_tiny, tiny_tokenizer

from distillspec.common.config import from_dict
from distillspec.tools.bench_serve import LocalServer
from distillspec.tools.configs import ServeConfig

openai = pytest.importorskip("openai")
MAX_RSS_GROWTH = 0.05  # the bound, over 200 requests after a warm-up


def resident_bytes() -> int:
    """This process's resident set (the server runs in it, on a thread)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    save_tiny(root / "target", layers=3, lm_scale=10.0, tokenizer=tiny_tokenizer())
    config = from_dict(ServeConfig, dict(
        target=str(root / "target"), draft="target-layers:1", port=0, model_name="tiny",
        max_batch=8, max_waiting=64, speculation={"gamma": 3},
        runtime={"device": "cpu", "dtype": "float32"}))
    local = LocalServer(config)
    url = local.__enter__()
    yield url
    local.__exit__(None, None, None)


def one_request(client, rng: random.Random) -> float:
    """A random request (length, temperature, stop, stream); its latency in seconds."""
    words = [f"w{rng.randrange(90)}" for _ in range(rng.randint(1, 12))]
    kwargs = dict(model="tiny", prompt=" ".join(words), max_tokens=rng.randint(1, 24),
                  temperature=rng.choice([0.0, 0.7, 1.0]), seed=rng.randrange(1000))
    if rng.random() < 0.3:
        kwargs["stop"] = [f"w{rng.randrange(90)}", f" w{rng.randrange(90)}"]
    start = time.perf_counter()
    if rng.random() < 0.5:
        text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    else:
        reply = client.completions.create(**kwargs)
        text = reply.choices[0].text
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert not any(stop in text for stop in kwargs.get("stop", []))
    return time.perf_counter() - start


def run_load(url: str, count: int, seed: int) -> list[float]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    rngs = [random.Random(seed * 1000 + i) for i in range(count)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda rng: one_request(client, rng), rngs, timeout=300))


def test_200_mixed_requests_at_concurrency_16_all_succeed_with_flat_memory(server, capsys):
    run_load(server, 48, seed=1)  # warm-up: every batch size and path allocated once
    before = resident_bytes()
    latencies = run_load(server, 200, seed=2)  # any failed request raises here
    growth = resident_bytes() / before - 1
    p50 = statistics.median(latencies)
    p99 = statistics.quantiles(latencies, n=100)[98]
    with capsys.disabled():
        print(f"\nload: 200 requests at concurrency 16, 0 failed, p50 {p50 * 1000:.0f} ms, "
              f"p99 {p99 * 1000:.0f} ms, resident memory growth {growth:+.1%}")
    assert len(latencies) == 200
    assert growth <= MAX_RSS_GROWTH, f"resident memory grew {growth:.1%} over 200 requests"

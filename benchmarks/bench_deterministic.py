"""Batch invariance of greedy serving, per runtime mode, on the real default model. Not a test.

For each ``--modes`` entry (``auto``: the default dtype; ``deterministic``: ``--deterministic``;
``bfloat16``/``float32``: that dtype) a ``distillspec serve`` app runs on loopback with the
given draft; ``--prompts`` chat prompts (``builtin:chat:heldout`` then ``:train``) are sent
one after another, then all at once (the openai client, greedy). Reported per mode: how many
concurrent answers equal their sequential answer (and the first differing character), the
sequential and concurrent tokens/s, and the dtype the models ran in.

    python benchmarks/bench_deterministic.py --out docs/results/deterministic
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from distillspec.common.config import from_dict
from distillspec.common.io import atomic_write_json
from distillspec.common.runtime import cpu_has_native_bf16, cpu_name
from distillspec.tools.bench_serve import LocalServer
from distillspec.tools.configs import ServeConfig
from distillspec.training.builtin_data import builtin_dataset_items


def chat_prompts(count: int) -> list[str]:
    items = builtin_dataset_items("builtin:chat:heldout") + builtin_dataset_items("builtin:chat")
    return [item.record["messages"][0]["content"] for item in items[:count]]


def first_difference(a: str, b: str) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def run_mode(mode: str, args, prompts: list[str]) -> dict:
    runtime = {"device": "cpu"}
    if mode == "deterministic":
        runtime["deterministic"] = True
    elif mode != "auto":
        runtime["dtype"] = mode
    config = from_dict(ServeConfig, dict(target=args.target, draft=args.draft, port=0,
                                         model_name="m", max_batch=len(prompts),
                                         runtime=runtime))
    local = LocalServer(config)
    dtype = str(local.server.engine.models[0].dtype)
    url = local.__enter__()
    try:
        import openai

        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

        def ask(prompt: str):
            reply = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}],
                max_tokens=args.max_tokens, temperature=0)
            return reply.choices[0].message.content, reply.usage.completion_tokens

        ask(prompts[0])  # warm-up
        start = time.perf_counter()
        sequential = [ask(p) for p in prompts]
        sequential_s = time.perf_counter() - start
        concurrent: list = [None] * len(prompts)

        def worker(i: int) -> None:
            concurrent[i] = ask(prompts[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent_s = time.perf_counter() - start
    finally:
        local.__exit__(None, None, None)
    differences = [first_difference(s[0], c[0]) for s, c in zip(sequential, concurrent)]
    tokens = sum(t for _, t in sequential)
    return {
        "mode": mode, "dtype": dtype, "prompts": len(prompts),
        "concurrent_equal_sequential": sum(d is None for d in differences),
        "first_differing_char": [d for d in differences if d is not None],
        "sequential_tokens_per_s": tokens / sequential_s,
        "concurrent_tokens_per_s": sum(t for _, t in concurrent) / concurrent_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="builtin:smollm2-135m")
    parser.add_argument("--draft", default="target-layers:2")
    parser.add_argument("--modes", default="auto,deterministic,bfloat16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="runs/deterministic")
    args = parser.parse_args()
    prompts = chat_prompts(args.prompts)
    rows = []
    for mode in args.modes.split(","):
        rows.append(run_mode(mode, args, prompts))
        print(rows[-1], flush=True)
        torch.use_deterministic_algorithms(False)
    report = {"command": "python benchmarks/bench_deterministic.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "cpu": cpu_name(), "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out) / "deterministic.json", report)


if __name__ == "__main__":
    main()

"""Batch invariance of greedy serving, per runtime mode, on the real default model. Not a test.

For each ``--modes`` entry (``auto``: the default dtype; ``deterministic``: ``--deterministic``;
``bfloat16``/``float32``: that dtype) a ``distillspec serve`` app runs on loopback with the
given draft; ``--prompts`` chat prompts (``builtin:chat:heldout`` then ``:train``) are sent
one after another, then all at once (the openai client, greedy). Reported per mode: how many
concurrent answers equal their sequential answer (and the first differing character), the
sequential and concurrent tokens/s, and the dtype the models ran in. Then, with the same
models, each prompt is decoded alone by plain greedy decoding and by greedy SD at each of
``--gammas``: how often SD's tokens equal plain decoding's (``decoding.quality.agreement``).

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
from distillspec.decoding.engine import Decoder
from distillspec.decoding.params import SpeculationConfig
from distillspec.decoding.quality import agreement
from distillspec.decoding.requests import Request
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


def decode_alone(target, draft, gamma: int, prompts: list[list[int]], max_tokens: int,
                 stop_ids: frozenset[int]) -> list[list[int]]:
    """Each prompt decoded greedily at batch 1 (plain when ``draft`` is None)."""
    outputs = []
    for prompt_ids in prompts:
        decoder = Decoder(target, draft, SpeculationConfig(gamma=gamma))
        decoder.add(Request(prompt_ids, max_tokens, stop_token_ids=stop_ids, request_id=0))
        tokens: list[int] = []
        while decoder.has_work:
            for update in decoder.step():
                tokens += update.new_tokens
        outputs.append(tokens)
    return outputs


def sd_agreement(server, prompts: list[str], max_tokens: int, gammas: list[int]) -> dict:
    """Per gamma: SD's greedy tokens against plain greedy decoding's, each prompt alone, as
    the server templates it; with the tokens/s of each."""
    tokenizer = server.tokenizer
    ids = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                   tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for p in prompts]
    target, draft, _ = server.engine.models

    def timed(model, gamma):
        start = time.perf_counter()
        outputs = decode_alone(target, model, gamma, ids, max_tokens, server.stop_ids)
        return outputs, sum(map(len, outputs)) / (time.perf_counter() - start)

    plain, plain_speed = timed(None, 1)
    rows = {"plain_tokens_per_s": plain_speed}
    for gamma in gammas:
        outputs, speed = timed(draft, gamma)
        rows[f"gamma_{gamma}"] = {**agreement(outputs, plain).to_dict(), "tokens_per_s": speed}
    return rows


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
    gammas = [int(g) for g in args.gammas.split(",") if g]
    sd_vs_plain = sd_agreement(local.server, prompts, args.max_tokens, gammas) if gammas else None
    return {
        "mode": mode, "dtype": dtype, "prompts": len(prompts),
        "concurrent_equal_sequential": sum(d is None for d in differences),
        "first_differing_char": [d for d in differences if d is not None],
        "sequential_tokens_per_s": tokens / sequential_s,
        "concurrent_tokens_per_s": sum(t for _, t in concurrent) / concurrent_s,
        "sd_vs_plain": sd_vs_plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="builtin:smollm2-135m")
    parser.add_argument("--draft", default="target-layers:2")
    parser.add_argument("--modes", default="auto,deterministic,bfloat16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--gammas", default="1,3",
                        help="SD-vs-plain agreement at these gammas (empty: skip it)")
    parser.add_argument("--out", default="runs/deterministic")
    args = parser.parse_args()
    prompts = chat_prompts(args.prompts)
    report = {"command": "python benchmarks/bench_deterministic.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "cpu": cpu_name(), "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(), "rows": []}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for mode in args.modes.split(","):
        report["rows"].append(run_mode(mode, args, prompts))
        print(report["rows"][-1], flush=True)
        torch.use_deterministic_algorithms(False)
        atomic_write_json(Path(args.out) / "deterministic.json", report)  # each mode as it ends


if __name__ == "__main__":
    main()

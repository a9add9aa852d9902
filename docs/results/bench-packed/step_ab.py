"""One target step (1 and 4 tokens) with packed linear layers on and off, eager and compiled,
in one process, 2 rounds (medians of 30 calls after 3 warm-ups; the first call's seconds too).

python step_ab.py DTYPE   (bfloat16 or float32)
"""

import os
import statistics
import sys
import time

import torch

from distillspec.decoding import packed_linear
from distillspec.decoding.kv_cache import CachedModel, compile_steps
from distillspec.models.loading import load_model

torch.manual_seed(0)
model, _ = load_model("builtin:smollm2-135m", dtype=sys.argv[1])
prompt = torch.randint(0, 49152, (1, 64))


def median_ms(fn, calls=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def arm(pack, compiled):
    packed_linear._swaps.pop(model, None)
    os.environ[packed_linear.ENV_SWITCH] = "1" if pack else "0"
    compile_steps(model, compiled)
    cached = CachedModel(model, rows=1, slots=prompt.shape[1] + 80)
    out = {}
    with torch.inference_mode():
        cached.forward(prompt)
        for width in (1, 4):
            tokens = prompt[:, -width:]

            def step(tokens=tokens, width=width):
                logits = cached.forward(tokens, logits_to_keep=1 if width == 1 else 0)
                cached.rollback([width])
                return logits

            start = time.perf_counter()
            step()
            first = time.perf_counter() - start
            out[width] = (round(median_ms(step), 2), round(first, 1))
    return out


for round_index in range(2):
    for pack in (False, True):
        for compiled in (False, True):
            print(round_index, "packed", pack, "compiled", compiled, arm(pack, compiled),
                  flush=True)

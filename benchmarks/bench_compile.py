"""Does ``torch.compile`` pay for a one-token decoding step on this machine?

Not a test, and not yet an engine path: it measures the question issue 9 asks before the
engine grows a compiled path. For SmolLM2-135M (the target) and its first N layers (a draft), a
one-token forward with transformers' ``StaticCache`` (fixed shapes, a tensor write position),
eager and under ``torch.compile`` (inductor, default mode), side by side in one run: medians of
``--repeats`` steps after warm-up, the compile time of the first call reported separately.
Also our engine's own eager step (``measure_cost_model``) for reference; it includes the
warp and the draw of a decoding step, which the static step does not, so
``compiled_speedup_vs_ours`` slightly flatters compilation.

    python benchmarks/bench_compile.py --out docs/results/compile.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import StaticCache

from distillspec.common.io import atomic_write_json
from distillspec.common.runtime import cpu_name
from distillspec.decoding.measure import measure_cost_model
from distillspec.models.drafts import truncate_layers
from distillspec.models.loading import load_model


def static_step(model, context: int, slots: int):
    """A one-token step function over a prefilled StaticCache, and the state it advances."""
    cache = StaticCache(config=model.config, max_cache_len=slots)
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    with torch.inference_mode():
        model(input_ids=prompt, past_key_values=cache, use_cache=True,
              cache_position=torch.arange(context))
    token = prompt[:, -1:]
    position = torch.tensor([context])

    def forward(input_ids, cache_position):
        return model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                     cache_position=cache_position, logits_to_keep=1).logits

    return forward, token, position


def time_steps(step, token, position, repeats: int) -> tuple[float, float]:
    """(first call seconds, median step seconds); the position advances, shapes stay fixed."""
    times = []
    with torch.inference_mode():
        for index in range(repeats + 3):
            start = time.perf_counter()
            step(token, position + index)
            times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[3:])


def measure(model, name: str, repeats: int, context: int) -> dict:
    slots = context + repeats + 8
    eager, token, position = static_step(model, context, slots)
    _, eager_s = time_steps(eager, token, position, repeats)
    forward, token, position = static_step(model, context, slots)
    compiled = torch.compile(forward, dynamic=False)
    first_s, compiled_s = time_steps(compiled, token, position, repeats)
    ours_s = measure_cost_model(model, None, context_tokens=context, max_verify=1,
                                repeats=repeats).target_step_s
    row = {"model": name, "static_eager_ms": eager_s * 1e3, "static_compiled_ms": compiled_s * 1e3,
           "compile_first_call_s": first_s, "ours_eager_ms": ours_s * 1e3,
           "compiled_speedup_vs_static_eager": eager_s / compiled_s,
           "compiled_speedup_vs_ours": ours_s / compiled_s}
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--context", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("docs/results/compile.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    target, _ = load_model("builtin:smollm2-135m", device="cpu", dtype=args.dtype)
    draft = truncate_layers(target, args.draft_layers)
    rows = [measure(target, "target (30 layers)", args.repeats, args.context),
            measure(draft, f"draft ({args.draft_layers} layers, full head)", args.repeats,
                    args.context)]
    atomic_write_json(args.out, {
        "command": "python benchmarks/bench_compile.py " + " ".join(argv or sys.argv[1:]),
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "dtype": str(target.dtype),
        "torch": torch.__version__, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

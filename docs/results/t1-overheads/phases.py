"""Where a tree step's time goes at T = 0 and T = 1, by phase, inside real steps.

The server's default pair and draft (the demo's), tree 4:1, one request per row (prompts 3, 4,
... of the chat held-out set, 500 tokens, no stop id), 6 steps of warm-up, then 60 steps
timed; each phase is timed by wrapping the function that runs it (host clock; the CPU runs
synchronously):
    fwd_draft / fwd_target  CachedModel.forward of the draft / the target
    children                TreeStep._children (the draft's candidates; sampled rows draw them)
    rule                    sampled_tree_outcome (the multi-draft rule and alpha; T = 1 only)
    finish                  finish_tree_block (cache bookkeeping, emitting)
    step                    TreeStep.step, all of it
Temperatures alternate 0, 1, 0, 1; ms per step.

    python phases.py on 1     # compiled steps, batch 1 (as distillspec bench runs them)
    python phases.py off 8    # eager steps, 8 rows (the server's default is --compile off)
    python phases.py off 1 15:2   # a third argument: another tree (../t1-depth2/)
"""

import collections
import sys
import time
from pathlib import Path

import torch

import distillspec.decoding.kv_cache as kv_cache
import distillspec.decoding.tree_step as tree_step
from distillspec.common.config import replace
from distillspec.common.runtime import apply_threads
from distillspec.decoding.engine import Decoder
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.requests import Request
from distillspec.tools.configs import ServeConfig
from distillspec.tools.generate import load_for_decoding, speculation_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve-anatomy"))
from anatomy import chat_prompts  # noqa: E402

SECONDS: dict[str, float] = collections.defaultdict(float)


def timed(owner, name: str, key) -> None:
    """Wrap ``owner.name`` so that its seconds add to SECONDS[key(args)] (key: str or a
    function of the call's first argument)."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        label = key if isinstance(key, str) else key(args[0])
        SECONDS[label] += time.perf_counter() - start
        return result

    setattr(owner, name, wrapper)


def main(compile_mode: str, batch: int, tree: str = "4:1") -> None:
    timed(tree_step, "sampled_tree_outcome", "rule")
    timed(tree_step.TreeStep, "_children", "children")
    timed(tree_step, "finish_tree_block", "finish")
    timed(tree_step.TreeStep, "step", "step")
    timed(kv_cache.CachedModel, "forward", lambda cached: "fwd_draft" if cached is DRAFT[0]
          else "fwd_target")
    config = ServeConfig()
    apply_threads(config.runtime)
    target, draft, tokenizer, spec = load_for_decoding(config.target, "auto", config.runtime,
                                                       compile_mode, batch)
    prompts = chat_prompts(tokenizer)
    base = speculation_for(config.speculation, spec, config.target, target, True)
    speculation = replace(base, tree=tree, confidence_threshold=0.0)
    for temperature in (0.0, 1.0, 0.0, 1.0):
        decoder = Decoder(target, draft, speculation, generator=torch.Generator().manual_seed(0))
        DRAFT[0] = decoder.draft
        for row in range(batch):
            decoder.add(Request(prompts[3 + row], 500, SamplingConfig(temperature=temperature),
                                frozenset(), None, row))
        for _ in range(6):
            decoder.step()
        SECONDS.clear()
        steps = 60
        for _ in range(steps):
            decoder.step()
        print(f"T={temperature:g}", {k: round(v / steps * 1e3, 2) for k, v in SECONDS.items()},
              flush=True)


DRAFT: list = [None]  # the draft's CachedModel of the running decoder

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "on", int(sys.argv[2]) if len(sys.argv) > 2 else 1,
         *sys.argv[3:4])

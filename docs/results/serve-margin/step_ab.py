"""Alternating single steps: plain Decoder vs SD Decoder held at plain, 16 rows, eager."""
import time, statistics, torch, sys, cProfile, pstats
from distillspec.common.runtime import apply_threads
from distillspec.tools.configs import ServeConfig, BenchConfig
from distillspec.tools.generate import load_for_decoding
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.decoding.engine import Decoder
from distillspec.decoding.requests import Request
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
config = ServeConfig(); apply_threads(config.runtime)
target, draft, tok, _ = load_for_decoding(config.target, "/work/runs/demo-gqa/run/final", config.runtime, "off", 1)
prompts = load_prompts_for_bench(BenchConfig(prompts="builtin:chat:train"), tok)
SPEC = SpeculationConfig(gamma=2, tree="3:1")
def make(sd):
    dec = Decoder(target, draft if sd else None, SPEC if sd else None)
    dec.lookahead_limit = 0 if sd else None
    for i in range(16):
        dec.add(Request(prompts[i % len(prompts)], 150, SamplingConfig(), frozenset(), None, i))
    dec.step()
    return dec
a, b = make(False), make(True)
ta, tb = [], []
for i in range(120):
    for dec, ts in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
        t = time.perf_counter(); dec.step(); ts.append(time.perf_counter() - t)
print("plain", round(statistics.median(ta) * 1e3, 2), "sd-plain", round(statistics.median(tb) * 1e3, 2), "ratio", round(statistics.median(tb) / statistics.median(ta), 3))
print("means", round(statistics.mean(ta) * 1e3, 2), round(statistics.mean(tb) * 1e3, 2))

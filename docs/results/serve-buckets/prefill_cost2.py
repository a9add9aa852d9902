import time, statistics, torch, collections
from distillspec.common.runtime import apply_threads
from distillspec.tools.configs import ServeConfig, BenchConfig
from distillspec.tools.generate import load_for_decoding
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.decoding.engine import Decoder
from distillspec.decoding import kv_cache
from distillspec.decoding.requests import Request
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
config = ServeConfig(); apply_threads(config.runtime)
target, draft, tok, spec = load_for_decoding(config.target, "/work/runs/demo-gqa/run/final", config.runtime, "on", 1)
prompts = load_prompts_for_bench(BenchConfig(prompts="builtin:chat:heldout", num_prompts=32), tok)
acc = collections.defaultdict(list)
CM = kv_cache.CachedModel
orig_fwd, orig_res = CM.forward, CM.reserve
def fwd(self, tokens, *a, **k):
    t = time.perf_counter(); r = orig_fwd(self, tokens, *a, **k); dt = time.perf_counter() - t
    if k.get("right_align"):
        acc[("prefill", "draft" if self.model is draft else "target", tokens.shape[0])].append(dt)
    return r
def res(self, *a):
    t = time.perf_counter(); r = orig_res(self, *a); acc[("reserve", "draft" if self.model is draft else "target")].append(time.perf_counter() - t); return r
CM.forward, CM.reserve = fwd, res
for rep in range(5):
    for k in (1, 2, 4, 16):
        dec = Decoder(target, draft, SpeculationConfig(gamma=2, tree="3:1"))
        dec.lookahead_limit = 0
        for i in range(16 - k):
            dec.add(Request(prompts[i % 12], 200, SamplingConfig(), frozenset(), None, i))
        for _ in range(4): dec.step()
        for j in range(k):
            dec.add(Request(prompts[(rep * 3 + j) % 12], 200, SamplingConfig(), frozenset(), None, 100 + j))
        dec.step()
for key, v in sorted(acc.items(), key=str):
    print(key, len(v), f"median {1e3*statistics.median(v):.1f} ms  min {1e3*min(v):.1f}")

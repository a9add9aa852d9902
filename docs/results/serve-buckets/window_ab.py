"""Side by side in one process: a compiled step's keys over the written window (now) against the
whole slot capacity (before), 16 rows and 1 row, for several capacities; medians of rounds."""
import time, statistics, torch, json
from distillspec.common.runtime import apply_threads
from distillspec.tools.configs import ServeConfig, BenchConfig
from distillspec.tools.generate import load_for_decoding
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.decoding.engine import Decoder
from distillspec.decoding.requests import Request
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding import kv_cache
config = ServeConfig(); apply_threads(config.runtime)
target, draft, tok, spec = load_for_decoding(config.target, "/work/runs/demo-gqa/run/final", config.runtime, "on", 1)
prompts = load_prompts_for_bench(BenchConfig(prompts="builtin:chat:heldout"), tok)
print("cpu", torch.backends.cpu.get_cpu_capability(), "dtype", next(target.parameters()).dtype)
real_forward = kv_cache.CachedModel._static_forward
def whole_forward(self, input_ids, positions, start, logits_to_keep, tree=None):
    """The step before: keys over the whole slot capacity."""
    count, width = input_ids.shape
    window = self.cache.slot_capacity
    mask = self._attention_mask(slice(0, count), start, width, capacity=window, tree=tree)
    self.cache.write_index = torch.arange(start, start + width, device=self.device)
    self.cache.write_count, self.cache.write_window = count, window
    try:
        return self._compiled_forward(self.model, input_ids, mask, positions, self.cache,
                                      logits_to_keep, self.cache_keyword)
    finally:
        self.cache.write_index = None
def run(rows, cap, whole):
    # whole: the window is the capacity (the code before), by making the window's bucket huge
    dec = Decoder(target, None)
    for i in range(rows):
        dec.add(Request(prompts[i % len(prompts)], 60, SamplingConfig(), frozenset(), None, i))
    dec.step(); dec.target.reserve(rows, cap)
    if whole:
        kv_cache.CachedModel._static_forward = whole_forward
    try:
        for _ in range(2): dec.step()
        ts = []
        for _ in range(10):
            t = time.perf_counter(); dec.step(); ts.append(time.perf_counter() - t)
    finally:
        kv_cache.CachedModel._static_forward = real_forward
    return statistics.median(ts) * 1e3
res = {}
for rnd in range(3):
    for rows in (1, 16):
        for cap in (256, 512, 1024):
            for whole in (False, True):
                res.setdefault(f"rows {rows} capacity {cap} {'whole capacity' if whole else 'window'}", []).append(run(rows, cap, whole))
out = {k: statistics.median(v) for k, v in res.items()}
for k, v in out.items(): print(f"{k:45s} {v:6.1f} ms")
json.dump({"per_step_ms_median_of_3_rounds": out, "rounds": res}, open("window_ab.json", "w"), indent=1)

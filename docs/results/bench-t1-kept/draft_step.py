"""The draft's and the target's one-token step after 96 tokens, timed alternately in one process
(300 interleaved calls each after 30 warm-ups, `CachedModel.forward` with the engine's packing and
compiled steps): run once per code version, alternating versions through PYTHONPATH."""
import time, statistics, torch
from distillspec.common.runtime import apply_threads
from distillspec.tools.configs import ServeConfig
from distillspec.tools.generate import load_for_decoding
from distillspec.decoding.kv_cache import CachedModel
config = ServeConfig(); apply_threads(config.runtime)
target, draft, tok, spec = load_for_decoding(config.target, "/work/runs/demo-gqa/run/final", config.runtime, "on", 1)
prompt = torch.randint(0, 40000, (1, 96), generator=torch.Generator().manual_seed(0))
res = {}
with torch.inference_mode():
    cms = {n: CachedModel(m, rows=1, slots=256) for n, m in (("target", target), ("draft", draft))}
    for cm in cms.values(): cm.forward(prompt)
    tok1 = prompt[:, :1]
    def step(cm):
        def f():
            cm.forward(tok1, logits_to_keep=1); cm.rollback([1])
        return f
    fs = {n: step(cm) for n, cm in cms.items()}
    for f in fs.values():
        for _ in range(30): f()
    ts = {n: [] for n in fs}
    for r in range(300):
        for n, f in fs.items():
            t = time.perf_counter(); f(); ts[n].append(time.perf_counter() - t)
print(" ".join(f"{n} {1e3*statistics.median(v):.3f}ms" for n, v in ts.items()))

"""Where a T = 1 tree step's time goes: wall time inside wrapped functions, per decoding step.

Decodes 6 prompts of builtin:chat:heldout (48 tokens each, batch 1) with the demo's draft
(/work/runs/demo-gqa/run/final) and compiled steps, twice untimed, then once with each listed
function wrapped by a perf_counter. Times are inclusive and nest (TreeStep._verify holds the
target's forward and TreeStep._sampled, which holds verify_tree, ...); CachedModel.forward is
both models' forwards; the mean step also holds the 6 prefill steps.

    python phase_t1.py [TREE] [TEMPERATURE]     # default 3:1 1.0
"""
import sys, time, statistics, collections, torch
from distillspec.common.runtime import apply_threads
from distillspec.decoding import tree_step, acceptance, sampling, engine, kv_cache
from distillspec.decoding.engine import Decoder
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.decoding.requests import Request
from distillspec.models.loading import eos_token_ids
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.tools.configs import BenchConfig, ServeConfig
from distillspec.tools.generate import load_for_decoding

tree = sys.argv[1] if len(sys.argv) > 1 else "3:1"
temp = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
config = ServeConfig()
apply_threads(config.runtime)
target, draft, tok, spec = load_for_decoding(config.target, "/work/runs/demo-gqa/run/final", config.runtime, "on", 1)
stop = frozenset(eos_token_ids(target, tok))
prompts = load_prompts_for_bench(BenchConfig(prompts="builtin:chat:heldout", num_prompts=6), tok)
spec_cfg = SpeculationConfig(gamma=2, tree=tree) if tree != "plain" else None
samp = SamplingConfig(temperature=temp) if temp > 0 else SamplingConfig()

acc = collections.Counter()
def wrap(mod, name, label=None):
    fn = getattr(mod, name)
    label = label or f"{getattr(mod, '__name__', mod)}.{name}"
    def inner(*a, **k):
        t = time.perf_counter(); r = fn(*a, **k); acc[label] += time.perf_counter() - t; return r
    setattr(mod, name, inner)
TS = tree_step.TreeStep
for n in ("_draft", "_children", "_verify", "_sampled"):
    wrap(TS, n, "TreeStep." + n)
wrap(tree_step, "finish_tree_block")
for name in ("verify_tree", "tree_acceptance", "sampled_tree_outcome"):  # before / after 7e73263
    if hasattr(tree_step, name):
        wrap(tree_step, name)
wrap(tree_step, "warp_rows"); wrap(tree_step, "tree_node_samples"); wrap(tree_step, "sampled_rows")
from distillspec.decoding import kv_cache as kc
CM = kc.CachedModel
wrap(CM, "forward", "CachedModel.forward"); wrap(CM, "keep_slots", "CachedModel.keep_slots")

def run():
    dec = Decoder(target, None if spec_cfg is None else draft, spec_cfg, generator=torch.Generator().manual_seed(0))
    n = 0; steps = []
    for i, p in enumerate(prompts):
        dec.add(Request(p, 48, samp, stop, None, i))
        while dec.has_work:
            t = time.perf_counter(); ups = dec.step(); steps.append(time.perf_counter() - t)
            n += sum(len(u.new_tokens) for u in ups)
            dec.finished.clear()
    return n, steps
run(); run()
acc.clear()
t = time.perf_counter(); n, steps = run(); w = time.perf_counter() - t
print(f"{tree} T={temp}: {n/w:.1f} tok/s, {len(steps)} steps, median step {1e3*statistics.median(steps):.2f} ms, mean {1e3*sum(steps)/len(steps):.2f}, tokens/step {n/len(steps):.2f}")
for k, v in acc.most_common():
    print(f"  {k:32s} {1e3*v/len(steps):7.3f} ms/step")

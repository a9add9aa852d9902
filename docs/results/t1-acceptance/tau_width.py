"""tau of sampled trees k:1 at T=1 (and timing, in-process, alternating) on a prompt split."""
import sys, time, statistics, torch
from distillspec.common.runtime import apply_threads
from distillspec.decoding.engine import Decoder
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.decoding.requests import Request
from distillspec.models.loading import eos_token_ids
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.tools.configs import BenchConfig, ServeConfig
from distillspec.tools.generate import load_for_decoding

split = sys.argv[1]; trees = sys.argv[2].split(","); rounds = int(sys.argv[3]); num = int(sys.argv[4]) if len(sys.argv) > 4 else 12
config = ServeConfig(); apply_threads(config.runtime)
target, draft, tok, spec = load_for_decoding(config.target, "/work/runs/demo-gqa/run/final", config.runtime, "on", 1)
stop = frozenset(eos_token_ids(target, tok))
prompts = load_prompts_for_bench(BenchConfig(prompts=split, num_prompts=num), tok)
samp = SamplingConfig(temperature=1.0)

def run(tree, seed):
    spec_cfg = None if tree == "plain" else SpeculationConfig(gamma=2, tree=tree)
    dec = Decoder(target, None if tree == "plain" else draft, spec_cfg, generator=torch.Generator().manual_seed(seed))
    n = steps = 0; t = time.perf_counter()
    for i, p in enumerate(prompts):
        dec.add(Request(p, 48, samp, stop, None, i))
        while dec.has_work:
            ups = dec.step(); steps += 1
            n += sum(len(u.new_tokens) for u in ups)
            dec.finished.clear()
    return n, steps - len(prompts), time.perf_counter() - t

for tree in trees: run(tree, 99)  # warm (compile)
res = {t: [] for t in trees}
for r in range(rounds):
    order = trees[r % len(trees):] + trees[: r % len(trees)]
    for tree in order:
        res[tree].append(run(tree, r))
base = [n / w for n, s, w in res["plain"]] if "plain" in res else None
for tree in trees:
    toks = sum(n for n, s, w in res[tree]); steps = sum(s for n, s, w in res[tree])
    rates = [n / w for n, s, w in res[tree]]
    line = f"{tree:8s} tokens/step {toks/steps:.3f}  tok/s median {statistics.median(rates):.1f}"
    if base:
        ratios = [a / b for a, b in zip(rates, base)]
        line += f"  ÷plain per round median {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"
    print(line, flush=True)

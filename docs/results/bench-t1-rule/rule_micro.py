"""sampled_tree_outcome eager vs compiled on random inputs of a T = 1 tree 3:1 block's shapes
(1 row, 49152-token vocabulary, q on 8192 ids), hot (the same call repeated 300 times)."""
import time, torch, statistics
from distillspec.decoding.tree import Tree
from distillspec.decoding.sampled_tree import sampled_tree_outcome
from distillspec.decoding.sampling import sample_without_replacement, warp
from distillspec.decoding.params import SamplingConfig
torch.manual_seed(0); torch.set_num_threads(2)
V, K = 49152, 8192
tree = Tree.parse("3:1")
kept = torch.randperm(V)[:K]
dl = torch.full((1, 1, V), float("-inf")); dl[..., kept] = torch.randn(1, 1, K) * 3
tlb = (torch.randn(1, 4, V) * 3).bfloat16()
s = SamplingConfig(temperature=1.0)
q = warp(dl, s); u = torch.rand(1, 7)
toks = torch.zeros(1, 3, dtype=torch.long)
toks[:, :3] = sample_without_replacement(q[:, 0], u[:, :3]); 
q2 = q.contiguous()
ma = torch.tensor([1])
def t(fn, n=300):
    xs = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); xs.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(xs)
for c in (False, True, False, True):
    f = lambda: sampled_tree_outcome(tree, toks, q2.clone(), tlb, [s], vocab=V, max_accepted=ma, lenience="none", epsilon=1.0, uniforms=(u[:, 3:6], u[:, 6]), compiled=c)
    f()
    print(c, t(f))
from torch._dynamo.utils import counters
print(dict(counters["stats"]))

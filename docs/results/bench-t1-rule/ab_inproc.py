"""The compiled sampled tree rule against the eager one in one process (the VM's speed moves
by up to 25 % between processes a minute apart): the same decode as ../bench-t1-kept/phase_t1.py (tree 3:1,
T = 1, 6 prompts x 48 tokens), runs alternating compiled / eager in swapped order each round.

    ROUNDS=10 python ab_inproc.py
"""
import os, sys, time, statistics
from distillspec.decoding import tree_step, sampled_tree
f = sampled_tree.sampled_tree_outcome
MODE = {"eager": False}
tree_step.sampled_tree_outcome = lambda *a, **k: f(*a, **(dict(k, compiled=False) if MODE["eager"] else k))
sys.argv = [sys.argv[0], "3:1", "1.0"]
src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench-t1-kept", "phase_t1.py")).read().split("run(); run()")[0]
exec(src)
run(); MODE["eager"] = True; run(); MODE["eager"] = False
res = {True: [], False: []}
for i in range(int(os.environ.get("ROUNDS", "6"))):
    for e in ((True, False) if i % 2 else (False, True)):
        MODE["eager"] = e
        t = time.perf_counter(); n, steps = run(); w = time.perf_counter() - t
        res[e].append(n / w)
for e in (False, True):
    print("eager" if e else "compiled", " ".join("%.1f" % x for x in res[e]), "median %.2f" % statistics.median(res[e]))
print("compiled/eager per round:", " ".join("%.3f" % (a / b) for a, b in zip(res[False], res[True])))

"""How often the target's greedy token is the draft's 1st, 2nd, ... choice, and what trees gain.

Not a test. For each prompt the target decodes ``--tokens`` tokens greedily; one forward of each
model over prompt + answer then gives, at every answer position, the rank of the target's token
in the draft's distribution (teacher-forced along the target's own path, which is exactly the
path a greedy tree verify follows). From those ranks:

* the rank profile (``decoding.tree.RANK_PROFILE`` is this figure for the demo's draft) and
  top-k agreement (top-1 = greedy alpha);
* for each tree, the expected tokens per block tau = 1 + sum over nodes of the frequency with
  which its rank path matches the ranks at consecutive positions (exact for a tree, no
  independence assumption), and the predicted speed-up tau / (depth c + V(nodes + 1)) with c
  and the verify curve measured here, side by side, in the same run.

    python benchmarks/bench_tree_profile.py --draft runs/demo/run/final \\
        --prompts builtin:chat:all --out docs/results/trees/profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from distillspec.common.io import atomic_write_json
from distillspec.decoding.measure import measure_cost_model
from distillspec.decoding.metrics import predicted_tree_speedup
from distillspec.decoding.tree import Tree
from distillspec.models.loading import build_draft, load_model
from distillspec.training.datasets import load_examples

TREES = ["1", "4:1", "8:1", "11:1", "6:2", "8:2", "15:2", "15:3", "24:3"]


@torch.inference_mode()
def draft_ranks(target, draft, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    ranks = []
    for index, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=target.device)
        answer = target.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        start = ids.shape[1] - 1
        target_tokens = target(answer).logits[0, start:-1].argmax(-1)
        draft_logits = draft(answer).logits[0, start:-1].float()
        chosen = draft_logits.gather(-1, target_tokens.unsqueeze(1))
        ranks.append((draft_logits > chosen).sum(-1).tolist())
        print(f"ranks: prompt {index + 1}/{len(prompts)}", flush=True)
    return ranks


def path_frequencies(ranks: list[list[int]], depth: int) -> tuple[dict, int]:
    counts: collections.Counter = collections.Counter()
    positions = 0
    for row in ranks:
        for start in range(len(row)):
            positions += 1
            path: tuple[int, ...] = ()
            for offset in range(min(depth, len(row) - start)):
                path += (row[start + offset],)
                counts[path] += 1
    return {path: count / positions for path, count in counts.items()}, positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="builtin:smollm2-135m")
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", default="builtin:chat:all")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--trees", default=";".join(TREES),
                        help="trees separated by ';' (each as generate's --tree)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    target, tokenizer = load_model(args.target)
    draft = build_draft(args.draft, target, tokenizer)
    examples = load_examples(args.prompts, tokenizer, max_prompt_tokens=128)
    ranks = draft_ranks(target, draft, [e.prompt_ids for e in examples], args.tokens)
    flat = [r for row in ranks for r in row]
    trees = {spec: Tree.parse(spec) for spec in args.trees.split(";")}
    frequencies, positions = path_frequencies(ranks, max(t.depth for t in trees.values()))
    widest = max(t.size for t in trees.values()) + 1
    cost = measure_cost_model(target, draft, max_verify=widest)
    rows = []
    for spec, tree in trees.items():
        tau = 1 + sum(frequencies.get(path, 0.0) for path in tree.paths)
        verify = cost.verify_cost(tree.size + 1)
        rows.append({"tree": spec, "paths": str(tree), "nodes": tree.size, "depth": tree.depth,
                     "tau": tau, "verify_cost": verify,
                     "predicted_speedup": predicted_tree_speedup(tau, tree.depth,
                                                                 cost.cost_ratio, verify)})
        print(f"{spec:6s} nodes {tree.size:2d} depth {tree.depth} tau {tau:.3f} "
              f"V {verify:.2f} predicted {rows[-1]['predicted_speedup']:.2f}x")
    report = {
        "target": args.target, "draft": args.draft, "prompts": args.prompts,
        "tokens": args.tokens, "positions": positions, "dtype": str(target.dtype),
        "rank_profile": [sum(1 for r in flat if r == k) / len(flat) for k in range(16)],
        "top_k_agreement": {k: sum(1 for r in flat if r < k) / len(flat)
                            for k in (1, 2, 3, 4, 6, 8, 16)},
        "cost_model": cost.to_dict(), "trees": rows,
        "minutes": (time.perf_counter() - started) / 60,
    }
    atomic_write_json(args.out, report)
    print(json.dumps(report["top_k_agreement"]))


if __name__ == "__main__":
    main()

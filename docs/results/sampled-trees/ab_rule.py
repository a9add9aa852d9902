"""A/B in one process: sampled trees with siblings drawn i.i.d. (SpecInfer, the old rule) against
drawn without replacement (the new rule), batch 1, the demo-v11 draft, interleaved rounds.

The old rule is restored by patching: its ``_try_children`` is copied below from the commit
before, and i.i.d. draws replace ``sample_without_replacement``.

Usage: python ab_rule.py PROMPTS TREES ROUNDS OUT.json [TEMPERATURE [TARGET DRAFT PROMPTS_N
TOKENS]] (defaults: 1.0, the demo pair, 12 prompts, 64 new tokens)
"""

import json
import statistics
import sys
import time

import torch

from distillspec.decoding import acceptance, sampling
from distillspec.decoding.acceptance import acceptance_probability, residual_distribution
from distillspec.decoding.measure import SpeedProbe
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.tools.bench import load_prompts_for_bench
from distillspec.tools.configs import BenchConfig

DRAFT = "/work/runs/demo-v11/run/final"


def old_try_children(children, node_tokens, residual, draft, uniforms, going, lenience, epsilon):
    """The i.i.d. rule: every sibling tested against the same q."""
    rows = torch.arange(children.shape[0], device=children.device)
    chosen = torch.full_like(children[:, 0], -1)
    for rank in range(children.shape[1]):
        child = children[:, rank]
        live = going & (chosen < 0) & (child >= 0)
        node = child.clamp_min(0)
        token = node_tokens[rows, node]
        accept = acceptance_probability(residual[rows, token], draft[rows, token], lenience,
                                        epsilon)
        accepted = live & (uniforms[rows, node] < accept)
        chosen = torch.where(accepted, child, chosen)
        rejected = (live & ~accepted).unsqueeze(1)
        residual = torch.where(rejected, residual_distribution(residual, draft), residual)
    return chosen, residual


def iid(probs, uniforms):
    """k i.i.d. inverse-CDF draws per row (the old sampler)."""
    k = uniforms.shape[-1]
    expanded = probs.unsqueeze(-2).expand(*probs.shape[:-1], k, probs.shape[-1])
    return sampling.sample(expanded, uniforms=uniforms)


NEW = (acceptance._try_children, sampling.sample_without_replacement)


def use(rule):
    pair = NEW if rule == "new" else (old_try_children, iid)
    acceptance._try_children, sampling.sample_without_replacement = pair


def main():
    prompts_spec, trees, rounds, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), \
        sys.argv[4]
    temperature = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    target_spec, draft_spec, count, tokens = (sys.argv[6:10] if len(sys.argv) > 9
                                              else ("builtin:smollm2-135m", DRAFT, 12, 64))
    target, tok = load_model(target_spec)
    draft, _ = load_model(draft_spec)
    prompts = load_prompts_for_bench(BenchConfig(prompts=prompts_spec, num_prompts=int(count)),
                                     tok)
    eos, pad = eos_token_ids(target, tok), pad_token_id(tok)
    rows = {}

    def run(label, fn):
        record_round(rows, label, fn)

    for round_ in range(rounds):
        probe = SpeedProbe(target, prompts, max_new_tokens=int(tokens), batch_size=1,
                           temperature=temperature, eos_token_id=eos, pad_id=pad, seed=round_)
        if round_ == 0:  # warm-up
            probe.plain(2)
            probe.speculative(draft, 1, tree=trees[0], batches=2)
        run("plain", probe.plain)
        for tree in trees:
            for rule in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
                use(rule)
                run(f"{rule} {tree}",
                    lambda probe=probe, tree=tree: probe.speculative(draft, 1, tree=tree))
        use("new")
    write_summary(rows, out, {"temperature": temperature})


def record_round(rows: dict, label: str, fn) -> None:
    """Time ``fn`` (a decode returning GenerationResults) and append its round to
    ``rows[label]``: tokens/s, tokens emitted and target calls."""
    start = time.perf_counter()
    results = fn()
    wall = time.perf_counter() - start
    tokens = sum(len(s) for r in results for s in r.sequences)
    calls = sum(r.metrics.target_forward_passes for r in results)
    rows.setdefault(label, []).append(
        {"tok_s": tokens / wall, "tokens": tokens, "target_calls": calls})
    print(label, round(tokens / wall, 2), "tau", round(tokens / max(calls, 1), 3), flush=True)


def write_summary(rows: dict, out: str, fields: dict) -> None:
    """Medians per arm (tok/s, ÷ the target alone's) and pooled tau from ``rows`` (label ->
    one record per round: tok_s, tokens, target_calls), printed and written to ``out`` with
    the CPU, torch, ``fields``, every round and the command line."""
    summary = {}
    for label, runs in rows.items():
        summary[label] = {
            "median_tok_s": statistics.median(x["tok_s"] for x in runs),
            "tau_pooled": sum(x["tokens"] for x in runs) / sum(x["target_calls"] for x in runs),
        }
    plain = summary["plain"]["median_tok_s"]
    for label, entry in summary.items():
        entry["vs_plain"] = entry["median_tok_s"] / plain
        print(f"{label:12s} {entry['median_tok_s']:6.2f} tok/s  x{entry['vs_plain']:.3f}  "
              f"tau {entry['tau_pooled']:.3f}")
    with open("/proc/cpuinfo") as handle:
        cpu = handle.read().split("model name")[1].split("\n")[0].strip(": \t")
    with open(out, "w") as handle:
        json.dump({"cpu": cpu, "torch": torch.__version__, **fields,
                   "rounds": rows, "summary": summary, "argv": sys.argv[1:]}, handle, indent=1)


if __name__ == "__main__":
    main()

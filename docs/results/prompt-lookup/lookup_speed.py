"""Prompt lookup beside the demo's draft (greedy, batch 1): each tree with and without lookup
blocks, and the target alone with lookup and no draft, timed as `distillspec demo` times its
splits (SpeedProbe: interleaved rounds against the target alone, medians, eager steps).

    python lookup_speed.py DRAFT_FOLDER OUT.json choose [ROUNDS]
        the choice split (the demo's 12): trees 4:1 and 15:2, each with lookup 0, 5 and 8
    python lookup_speed.py TARGET/DRAFT OUT.json code LOOKUP [ROUNDS]
        8 held-out HumanEval tasks with a code pair (e.g. builtin:qwen2.5-coder-1.5b/
        builtin:qwen2.5-coder-0.5b, the draft's weights int8): chain gamma 5 with lookup 0 and
        LOOKUP, and (2 rounds) the target alone with LOOKUP
    python lookup_speed.py DRAFT_FOLDER OUT.json report TREE LOOKUP [ROUNDS]
        the demo's report split (16) and 24 requests written apart (other-eval.jsonl): trees 4:1
        and 15:2 without lookup, TREE with LOOKUP, and (2 rounds) the target alone with LOOKUP
    python lookup_speed.py DRAFT_FOLDER OUT.json sampled TREE LOOKUP [ROUNDS]
        the same two sets at T = 1 (sampled lookup, stop 68): TREE without and with LOOKUP, and
        (2 rounds) the target alone with LOOKUP
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from distillspec.decoding.measure import SpeedProbe, measure_cost_model
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.tools.demo import _prompts

TARGET = "builtin:smollm2-135m"
HERE = Path(__file__).resolve().parent
SPLITS = {  # name: (prompts, how many): the demo's splits, and requests written apart
    "choice": ("builtin:chat:heldout", 12),
    "report": ("builtin:chat:train", 16),
    "other": (str(HERE.parent / "written-prompts-2" / "other-eval.jsonl"), 24),
    "code": ("builtin:humaneval:heldout", 8),
}


def timed_split(target, tokenizer, draft, split, settings, rounds, lookup_alone=None,
                temperature=0.0):
    spec, count = SPLITS[split]
    prompts = _prompts(spec, tokenizer, 512 if split == "code" else 128)[:count]
    probe = SpeedProbe(target, prompts, max_new_tokens=64, temperature=temperature,
                       eos_token_id=eos_token_ids(target, tokenizer), pad_id=pad_token_id(tokenizer))
    cost = measure_cost_model(target, draft, max_verify=16)
    start = time.perf_counter()
    record = {"prompts": spec, "count": len(prompts), "temperature": temperature,
              "with_draft": probe.sweep(draft, settings, rounds, cost,
                                        progress=print).to_dict()}
    if lookup_alone:  # the target with lookup only, against its own target-alone rounds
        record["no_draft"] = probe.sweep(None, [(1, 0.0, None, lookup_alone)], 2).to_dict()
    record["seconds"] = time.perf_counter() - start
    for part in ("with_draft", "no_draft"):
        for row in record.get(part, {}).get("rows", []):
            print(f"{split} {part}: tree {row['tree'] or '-'} lookup {row['lookup']}: "
                  f"{row['speedup']:.3f}x (rounds {row['speedup_rounds']}), tau "
                  f"{row['block_efficiency']:.2f}, agreement {row['agreement']}", flush=True)
    return record


def main() -> None:
    draft_dir, out, mode, *rest = sys.argv[1:]
    if mode == "code":
        from distillspec.models.quantize import quantize_draft

        target_spec, draft_dir = draft_dir.split("/", 1)
        target, tokenizer = load_model(target_spec)
        draft = quantize_draft(load_model(draft_dir, dtype=target.dtype)[0], "int8")
    else:
        target, tokenizer = load_model(TARGET)
        draft, _ = load_model(draft_dir)
    record = {"draft": draft_dir, "mode": mode, "dtype": str(target.dtype),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "splits": {}}
    if mode == "code":
        lookup = int(rest[0])
        rounds = int(rest[1]) if len(rest) > 1 else 3
        settings = [(5, 0.0, None, 0), (5, 0.0, None, lookup)]
        record["splits"]["code"] = timed_split(target, tokenizer, draft, "code", settings, rounds,
                                               lookup_alone=lookup)
    elif mode == "choose":
        rounds = int(rest[0]) if rest else 3
        settings = [(1, 0.0, tree, lookup) for tree in ("4:1", "15:2") for lookup in (0, 5, 8)]
        record["splits"]["choice"] = timed_split(target, tokenizer, draft, "choice", settings, rounds)
    else:
        tree, lookup = rest[0], int(rest[1])
        rounds = int(rest[2]) if len(rest) > 2 else 3
        settings = [(1, 0.0, "4:1", 0), (1, 0.0, "15:2", 0), (1, 0.0, tree, lookup)]
        if mode == "sampled":
            settings = [(1, 0.0, tree, 0), (1, 0.0, tree, lookup)]
        for split in ("report", "other"):
            record["splits"][split] = timed_split(
                target, tokenizer, draft, split, settings, rounds, lookup_alone=lookup,
                temperature=1.0 if mode == "sampled" else 0.0)
    record["args"] = sys.argv[1:]
    Path(out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

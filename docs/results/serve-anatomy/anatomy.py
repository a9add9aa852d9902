"""Where a served concurrency level's time goes, step by step (issue 22's serving target).

bench-serve's level in one process, without HTTP: ``concurrency`` clients each send their next
request (greedy, 48 tokens, the chat held-out prompts with the chat template) as soon as the
previous one finishes, ``count`` requests in all; the engine loop is the server's (admit, choose
the arm with ``ModePolicy``, one ``Decoder.step``, record it unless it admitted rows or timed a
kernel choice: the latter since commit 7a53e84, after anatomy-*.json and serve-avx2's were made). Modes:
``plain`` (no draft), ``auto`` (the server's default policy) and ``always`` (speculate as
configured on every step), interleaved for ``rounds`` rounds; ``--modes`` picks among them and
``auto-unsettled`` (auto as before commit "settles a batch-size bucket": no bucket settles on
plain). Every step is logged (mode,
batch, admitting, arm, tokens emitted, seconds); the summary splits each level's time into
admission steps (prefill + one step) and decoding steps, and gives the steady-state tokens/s of
every arm at each batch size.

    python anatomy.py [--draft-quantize int8] [--rounds 2] [--modes plain,auto,always]
                      [--concurrency 4,16] [--out anatomy.json]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import time

from distillspec.common.runtime import apply_threads
from distillspec.decoding import packed_linear
from distillspec.decoding.engine import Decoder
from distillspec.decoding.mode_policy import ModePolicy
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.requests import Request
from distillspec.models.loading import eos_token_ids
from distillspec.models.quantize import quantize_draft
from distillspec.tools.configs import ServeConfig
from distillspec.tools.generate import load_for_decoding, speculation_for
from distillspec.training.builtin_data import builtin_dataset_items

MODES = ("plain", "auto", "always", "auto-unsettled")


def chat_prompts(tokenizer) -> list[list[int]]:
    prompts = []
    for item in builtin_dataset_items("builtin:chat:heldout"):
        record = item.record or {}
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts


def level(models, speculation, stop, prompts, mode, concurrency, count, policy, log) -> float:
    """Run one level; returns its output tokens/s and appends every step to ``log``."""
    target, draft = models
    decoder = Decoder(target, None if mode == "plain" else draft, speculation)
    jobs = [prompts[i % len(prompts)] for i in range(count)]
    sent = live = emitted = 0

    def add() -> None:
        nonlocal sent, live
        decoder.add(Request(jobs[sent], 48, SamplingConfig(), stop, None, sent))
        sent, live = sent + 1, live + 1

    while sent < count and live < concurrency:
        add()
    start = time.perf_counter()
    while decoder.has_work:
        batch, admitting = len(decoder.rows) + len(decoder.queue), bool(decoder.queue)
        arm = policy.choose(batch) if policy is not None else None
        decoder.lookahead_limit = arm
        tunings, step_start = packed_linear.tunings(), time.perf_counter()
        updates = decoder.step()
        seconds = time.perf_counter() - step_start
        tokens = sum(len(update.new_tokens) for update in updates)
        emitted += tokens
        if policy is not None and not admitting and packed_linear.tunings() == tunings:
            policy.record(batch, arm, tokens, seconds)
        log.append({"mode": mode, "concurrency": concurrency, "batch": batch,
                    "admitting": admitting, "arm": arm, "tokens": tokens, "seconds": seconds})
        decoder.finished.clear()
        for update in updates:
            if update.finished:
                live -= 1
                if sent < count:
                    add()
    return emitted / (time.perf_counter() - start)


def arm_label(step: dict) -> str:
    """``plain`` / ``always``, or a policy-driven mode's ``<mode>:<arm>`` (auto:plain, ...)."""
    mode = step["mode"]
    if mode in ("plain", "always"):
        return mode
    return {None: f"{mode}:speculate", 0: f"{mode}:plain"}.get(step["arm"],
                                                               f"{mode}:gamma{step['arm']}")


def summarise(log: list[dict], rates: dict) -> dict:
    levels = {}
    for (mode, concurrency), values in rates.items():
        steps = [s for s in log if s["mode"] == mode and s["concurrency"] == concurrency]
        admissions = [s for s in steps if s["admitting"]]
        levels[f"{mode} c{concurrency}"] = {
            "tokens_per_s": values, "median_tokens_per_s": statistics.median(values),
            "steps": len(steps), "admission_steps": len(admissions),
            "admission_s": sum(s["seconds"] for s in admissions),
            "decoding_s": sum(s["seconds"] for s in steps if not s["admitting"]),
            "tokens": sum(s["tokens"] for s in steps),
        }
    by_arm = collections.defaultdict(list)
    for step in log:
        if not step["admitting"]:
            by_arm[(arm_label(step), step["batch"])].append(step)
    arms = {}
    for (label, batch), steps in sorted(by_arm.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if len(steps) >= 5:
            seconds = statistics.median(s["seconds"] for s in steps)
            per_row = statistics.mean(s["tokens"] / batch for s in steps)
            arms[f"{label} batch {batch}"] = {"steps": len(steps), "median_step_ms": 1e3 * seconds,
                                              "tokens_per_row": per_row,
                                              "tokens_per_s": batch * per_row / seconds}
    return {"levels": levels, "steady_state": arms}


def setup(draft_quantize: str):
    """The server's default pair, setting, stop ids and the held-out chat prompts, after a
    warm-up: ``((target, draft), speculation, stop, prompts, draft spec)``."""
    config = ServeConfig()
    apply_threads(config.runtime)
    target, draft, tokenizer, spec = load_for_decoding(config.target, "auto", config.runtime,
                                                       "off", 16)
    draft = quantize_draft(copy.deepcopy(draft), draft_quantize)
    speculation = speculation_for(config.speculation, spec, config.target, target, True)
    stop = frozenset(eos_token_ids(target, tokenizer))
    prompts = chat_prompts(tokenizer)
    models = (target, draft)
    for mode in ("plain", "always"):  # warm-up
        level(models, speculation, stop, prompts, mode, 1, 2, None, [])
    return models, speculation, stop, prompts, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft-quantize", default="none", choices=("none", "int8"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="4,16")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--modes", default="plain,auto,always")
    parser.add_argument("--out", default="anatomy.json")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes must list modes among {', '.join(MODES)}")
    models, speculation, stop, prompts, spec = setup(args.draft_quantize)
    tree = speculation.tree_shape is not None
    policies = {"auto": ModePolicy.for_speculation(speculation.gamma, tree),
                "auto-unsettled": ModePolicy.for_speculation(speculation.gamma, tree, settle=0)}
    log, rates = [], collections.defaultdict(list)
    for round_index in range(args.rounds):
        for concurrency in map(int, args.concurrency.split(",")):
            for mode in modes:
                rate = level(models, speculation, stop, prompts, mode, concurrency, args.count,
                             policies.get(mode), log)
                rates[(mode, concurrency)].append(rate)
                print(f"round {round_index + 1}: {mode} at {concurrency}: {rate:.1f} tok/s",
                      flush=True)
    report = {"draft": spec, "draft_quantize": args.draft_quantize,
              "speculation": repr(speculation), "rounds": args.rounds, "count": args.count,
              **summarise(log, rates), "steps": log}
    with open(args.out, "w") as out:
        json.dump(report, out, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=1))


if __name__ == "__main__":
    main()

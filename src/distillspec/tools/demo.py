"""``distillspec demo``: measure a draft, distil it, measure again, on the embedded default.

1. Validate the inputs and claim the output folder (``--fresh`` removes only what a demo wrote).
2. Build the draft (``--distill.draft-init``) and measure speculative decoding on held-out chat
   prompts: alpha (T=0 and T=1), and a greedy batch-1 gamma sweep against the target alone,
   side by side (``decoding.measure``).
3. Distil (``training.loop.distill``) within ``--minutes``, with a live progress bar and
   alpha/tau evaluated along the way. The default data are the target's greedy answers to the
   training prompts, generated once inside the budget (``teacher_cache``): greedy SD is verified
   along exactly those trajectories.
4. Measure again, print a before/after table, write ``report.json`` and PNG plots, and record the
   draft so that ``distillspec generate`` uses it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distillspec.common.config import changed_flags, replace, to_dict
from distillspec.common.io import atomic_write_json
from distillspec.common.rundir import claim
from distillspec.common.runtime import apply_threads, resolve_dtype
from distillspec.decoding.measure import SpeedProbe, Sweep
from distillspec.models.loading import build_draft, eos_token_ids, load_model, pad_token_id
from distillspec.models.registry import record_distilled_draft
from distillspec.tools.configs import DemoConfig
from distillspec.training.datasets import load_examples
from distillspec.training.evaluate import SDEvaluator

ENTRIES = ("run", "report.json", "alpha_over_training.png", "gamma_sweep.png")


def _say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


class Measurement:
    """alpha on held-out prompts and a greedy batch-1 gamma sweep, for any draft."""

    def __init__(self, config: DemoConfig, target, tokenizer):
        recipe = config.distill
        examples = load_examples(recipe.eval_data, tokenizer,
                                 max_prompt_tokens=recipe.max_prompt_tokens)
        prompts = [e.prompt_ids for e in examples]
        pad_id, eos = pad_token_id(tokenizer), eos_token_ids(target, tokenizer)
        self.config = config
        self.evaluator = SDEvaluator(
            target, prompts[: recipe.eval_prompts], max_new_tokens=config.max_new_tokens,
            tau_prompts=0, gamma=config.gammas[0], eos_token_id=eos, seed=recipe.seed,
            pad_id=pad_id,
        )
        self.probe = SpeedProbe(target, prompts[: config.speed_prompts],
                                max_new_tokens=config.max_new_tokens, pad_id=pad_id)

    def measure(self, draft, label: str) -> dict[str, Any]:
        start = time.perf_counter()
        alpha = self.evaluator.alpha(draft)
        settings = [(gamma, 0.0) for gamma in self.config.gammas]
        done = []

        def progress(row) -> None:
            done.append(row)
            elapsed = time.perf_counter() - start
            left = elapsed / len(done) * (len(settings) - len(done))
            _say(f"  {label}: gamma {row.gamma}: {row.tokens_per_s:.1f} tok/s, tau "
                 f"{row.block_efficiency:.2f} ({len(done)}/{len(settings)}, ~{left:.0f}s left)")

        sweep = self.probe.sweep(draft, settings, self.config.repeats, progress=progress)
        return {**alpha, **_summary(sweep), "measure_seconds": time.perf_counter() - start}


def _summary(sweep: Sweep) -> dict[str, Any]:
    rows = [
        {"gamma": r.gamma, "sd_tokens_per_s": r.tokens_per_s, "block_efficiency": r.block_efficiency,
         "acceptance_rate": r.acceptance_rate, "speedup": r.speedup, "cost_ratio": r.cost_ratio}
        for r in sweep.rows
    ]
    best = max(rows, key=lambda r: r["sd_tokens_per_s"])
    return {"target_tokens_per_s": sweep.plain_tokens_per_s, "by_gamma": rows, "best": best}


def _check_inputs(config: DemoConfig) -> None:
    from distillspec.training.setup import check_inputs

    check_inputs(config.distill)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from distillspec.tools.plots import plot_alpha_over_training, plot_gamma_sweep
    from distillspec.training.loop import distill

    apply_threads(config.runtime)
    _check_inputs(config)  # before anything is written or removed
    out = claim(config.out, "demo", fresh=config.fresh)
    out.track(*ENTRIES)
    recipe = replace(config.distill, output_dir=str(out.child("run")), max_minutes=config.minutes)
    run_dir = Path(recipe.output_dir)
    torch.manual_seed(recipe.seed)
    runtime = config.runtime
    target, tokenizer = load_model(recipe.target, device=runtime.device, dtype=runtime.dtype,
                                   trust_remote_code=runtime.trust_remote_code)
    measurement = Measurement(config, target, tokenizer)
    report_path = out.child("report.json")
    previous = json.loads(report_path.read_text()) if report_path.is_file() else None
    if previous and (run_dir / "final").is_dir():
        _say("reusing the distilled draft from the last run (--fresh starts over)")
        before = previous["before"]
    else:
        _say(f"measuring the undistilled draft ({recipe.draft_init}) ...")
        initial = build_draft(recipe.draft_init, target, tokenizer)
        before = measurement.measure(initial, "before")
        del initial
        _say(f"distilling for {config.minutes:g} minutes, then measuring again "
             f"(~{before['measure_seconds'] / 60:.1f} min) ...")
        distill(recipe)
    distilled, _ = load_model(run_dir / "final", device=target.device, dtype=target.dtype)
    _say("measuring the distilled draft ...")
    after = measurement.measure(distilled, "after")
    record_distilled_draft(recipe.target, run_dir / "final")
    evals = _evals(run_dir)
    report = {
        "command": ("distillspec demo " + changed_flags(config)).strip(),
        "config": to_dict(config),
        "target": recipe.target,
        "draft_init": recipe.draft_init,
        "dtype": str(resolve_dtype(runtime.dtype, target.device)),
        "device": str(target.device),
        "train_minutes": evals[-1].get("train_seconds", 0) / 60 if evals else None,
        "train_steps": evals[-1]["step"] if evals else None,
        "before": before,
        "after": after,
        "evals": evals,
    }
    atomic_write_json(report_path, report)
    plot_alpha_over_training(evals, out.child("alpha_over_training.png"))
    plot_gamma_sweep(before["by_gamma"], after["by_gamma"], out.child("gamma_sweep.png"))
    print(before_after_table(report))
    _say(f"wrote {report_path}, {out.path / 'alpha_over_training.png'}, "
         f"{out.path / 'gamma_sweep.png'}; `distillspec generate` now uses this draft")
    return report


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "eval" in r]


def before_after_table(report: dict[str, Any]) -> str:
    before, after = report["before"], report["after"]
    rows = [
        ("alpha (greedy, T=0)", f"{before['alpha_t0']:.3f}", f"{after['alpha_t0']:.3f}"),
        ("alpha (sampled, T=1)", f"{before['alpha_t1']:.3f}", f"{after['alpha_t1']:.3f}"),
        ("best gamma", str(before["best"]["gamma"]), str(after["best"]["gamma"])),
        ("tau at best gamma", f"{before['best']['block_efficiency']:.2f}",
         f"{after['best']['block_efficiency']:.2f}"),
        ("target alone tok/s", f"{before['target_tokens_per_s']:.1f}",
         f"{after['target_tokens_per_s']:.1f}"),
        ("SD tok/s at best gamma", f"{before['best']['sd_tokens_per_s']:.1f}",
         f"{after['best']['sd_tokens_per_s']:.1f}"),
        ("SD speed-up vs target alone", f"{before['best']['speedup']:.2f}×",
         f"{after['best']['speedup']:.2f}×"),
    ]
    lines = [
        "| held-out chat prompts, greedy, batch 1 | before | after distillation |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {b} | {a} |" for name, b, a in rows]
    return "\n".join(lines)

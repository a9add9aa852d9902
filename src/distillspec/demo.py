"""``distillspec demo``: measure a draft, distil it, measure again, on the embedded default.

1. Build the draft from the target (``draft_init``, default its first 4 layers) and measure
   speculative decoding on held-out chat prompts: alpha (T=0 and T=1), tau and tokens/s of SD
   at several gammas against the target alone, side by side.
2. Distil (``distillspec.train.distill``) within ``--minutes``, with a live progress bar and
   alpha/tau evaluated along the way. The default data are the target's greedy answers to the
   training prompts, generated once inside the budget: greedy SD is verified along exactly those
   trajectories. On this CPU they raised held-out greedy alpha from 0.04 to 0.18 in 20 steps
   (1.4 min), where on-policy draft samples left it at 0.04 after 20 steps (2.2 min) and 0.06
   after 4.2 min (docs/results/demo/onpolicy-partial-metrics.jsonl).
3. Measure again, print a before/after table, write ``report.json`` and PNG plots.
The distilled draft is kept in ``OUT/run/final`` and reused by the next run (``--fresh``
starts over).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from distillspec.config import DemoConfig, DistillConfig, to_dict
from distillspec.datasets import load_examples
from distillspec.engine import autoregressive_generate, speculative_generate, synchronize
from distillspec.evaluate import SDEvaluator
from distillspec.loading import eos_token_ids, load_model, pad_token_id, resolve_dtype
from distillspec.metrics import combined_counts
from distillspec.policies import left_pad


def _timed(fn, device: torch.device) -> tuple[float, object]:
    """Wall time of ``fn()`` (CUDA synchronised before reading the clock) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


class SpeedProbe:
    """Greedy batch-1 decoding of the held-out prompts: target alone vs SD at each gamma."""

    def __init__(self, target, prompts: list[list[int]], config: DemoConfig, pad_id: int):
        self.target, self.config = target, config
        self.inputs = [left_pad([p], pad_id, target.device) for p in prompts]
        self.tokens = len(prompts) * config.max_new_tokens

    def _plain(self) -> None:
        for ids, mask in self.inputs:
            autoregressive_generate(
                self.target, ids, mask, max_new_tokens=self.config.max_new_tokens
            )

    def _speculative(self, draft, gamma: int) -> list:
        return [
            speculative_generate(
                self.target,
                draft,
                ids,
                mask,
                gamma=gamma,
                max_new_tokens=self.config.max_new_tokens,
            )
            for ids, mask in self.inputs
        ]

    def measure(self, draft, label: str) -> dict[str, Any]:
        """Warm-up, then per gamma the median of ``repeats`` runs, plain runs interleaved."""
        draft.eval()
        self._plain()  # warm-up, discarded
        plain_walls, rows = [], []
        for gamma in self.config.gamma_list():
            plain_walls.append(_timed(self._plain, self.target.device)[0])
            walls, results = [], None
            for _ in range(self.config.repeats):
                wall, results = _timed(
                    lambda g=gamma: self._speculative(draft, g), self.target.device
                )
                walls.append(wall)
            total = combined_counts(results)
            rows.append(
                {
                    "gamma": gamma,
                    "sd_tokens_per_s": self.tokens / statistics.median(walls),
                    "block_efficiency": total.block_efficiency,
                    "acceptance_rate": total.acceptance_rate or 0.0,
                }
            )
            print(
                f"  {label}: gamma {gamma}: {rows[-1]['sd_tokens_per_s']:.1f} tok/s, "
                f"tau {rows[-1]['block_efficiency']:.2f}",
                flush=True,
            )
        plain_tps = self.tokens / statistics.median(plain_walls)
        for row in rows:
            row["speedup"] = row["sd_tokens_per_s"] / plain_tps
        best = max(rows, key=lambda r: r["sd_tokens_per_s"])
        return {"target_tokens_per_s": plain_tps, "by_gamma": rows, "best": best}


DEMO_POLICIES = {
    # demo policy -> (DistillConfig policy, mix, needs the cached greedy target data)
    "draft": ("draft", None, False),
    "target-greedy": ("fixed", None, True),
    "mixed-greedy": ("mixed", "fixed=0.5,draft=0.5", True),
}


def _distill_config(config: DemoConfig, run_dir: Path, data: str, minutes: float) -> DistillConfig:
    policy, mix, _ = DEMO_POLICIES[config.policy]
    return DistillConfig(
        target=config.target,
        draft_init=config.draft_init,
        data=data,
        eval_data=config.eval_data,
        policy=policy,
        mix=mix or "draft=0.5,teacher=0.5",
        divergence=config.divergence,
        max_steps=100_000,
        max_minutes=minutes,
        batch_size=config.batch_size,
        max_new_tokens=config.train_new_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        max_completion_tokens=config.train_new_tokens,
        lr=config.lr,
        warmup_steps=10,
        eval_every=config.eval_every,
        save_every=config.eval_every,
        eval_prompts=config.eval_prompts,
        eval_tau_prompts=4,
        eval_gamma=4,
        eval_max_new_tokens=config.max_new_tokens,
        output_dir=str(run_dir),
        resume=True,
        seed=config.seed,
        device=config.device,
    )


def _greedy_target_data(config: DemoConfig, target, tokenizer, out: Path) -> tuple[str, float]:
    """The target's greedy continuations of the training prompts, generated once and cached:
    greedy SD is verified along exactly these trajectories. Returns (path, minutes spent)."""
    from distillspec.policies import datagen

    path = out / "target-greedy.jsonl"
    if path.is_file():
        return str(path), 0.0
    start = time.perf_counter()
    examples = load_examples(config.data, tokenizer, max_prompt_tokens=config.max_prompt_tokens)
    print(
        f"demo: generating the target's greedy answers to {len(examples)} training prompts "
        "(once; counted in the budget) ...",
        flush=True,
    )
    datagen(
        target,
        tokenizer,
        examples,
        path,
        temperature=0.0,
        max_new_tokens=config.train_new_tokens,
        batch_size=16,
        eos_token_id=eos_token_ids(target, tokenizer),
        generator=None,
    )
    return str(path), (time.perf_counter() - start) / 60


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if "eval" in r]


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from distillspec.drafts import parse_layer_spec, truncate_layers
    from distillspec.plots import plot_alpha_over_training, plot_gamma_sweep
    from distillspec.train import distill

    out = Path(config.out)
    run_dir = out / "run"
    if config.fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    target, tokenizer = load_model(config.target, device=config.device, dtype=config.dtype)
    eval_examples = load_examples(
        config.eval_data, tokenizer, max_prompt_tokens=config.max_prompt_tokens
    )
    prompts = [e.prompt_ids for e in eval_examples]
    pad_id = pad_token_id(tokenizer)
    evaluator = SDEvaluator(
        target,
        prompts[: config.eval_prompts],
        max_new_tokens=config.max_new_tokens,
        tau_prompts=0,
        gamma=4,
        eos_token_id=eos_token_ids(target, tokenizer),
        seed=config.seed,
        pad_id=pad_id,
    )
    probe = SpeedProbe(target, prompts[: config.speed_prompts], config, pad_id)
    previous = (
        json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    )
    if previous and (run_dir / "final").is_dir():
        print("demo: reusing the distilled draft from the last run (--fresh starts over)")
        before = previous["before"]
    else:
        print(f"demo: measuring the undistilled draft ({config.draft_init}) ...", flush=True)
        layers = parse_layer_spec(config.draft_init)
        initial = (
            truncate_layers(target, layers)
            if layers is not None
            else load_model(config.draft_init, device=target.device, dtype=target.dtype)[0]
        )
        before = {**evaluator.alpha(initial), **probe.measure(initial, "before")}
        del initial
        data, datagen_minutes = config.data, 0.0
        if DEMO_POLICIES[config.policy][2]:
            data, datagen_minutes = _greedy_target_data(config, target, tokenizer, out)
        minutes = max(config.minutes - datagen_minutes, config.minutes / 4)
        print(f"demo: distilling ({config.policy}) for {minutes:.1f} minutes ...", flush=True)
        distill(_distill_config(config, run_dir, data, minutes))
        before["datagen_minutes"] = datagen_minutes
    distilled, _ = load_model(run_dir / "final", device=target.device, dtype=target.dtype)
    print("demo: measuring the distilled draft ...", flush=True)
    after = {**evaluator.alpha(distilled), **probe.measure(distilled, "after")}
    evals = _evals(run_dir)
    report = {
        "command": "distillspec demo " + config.command_line(),
        "config": to_dict(config),
        "target": config.target,
        "draft_init": config.draft_init,
        "dtype": str(resolve_dtype(config.dtype, target.device)),
        "device": str(target.device),
        "train_minutes": evals[-1].get("train_seconds", 0) / 60 if evals else None,
        "train_steps": evals[-1]["step"] if evals else None,
        "before": before,
        "after": after,
        "evals": evals,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_alpha_over_training(evals, out / "alpha_over_training.png")
    plot_gamma_sweep(before["by_gamma"], after["by_gamma"], out / "gamma_sweep.png")
    print(before_after_table(report))
    print(
        f"demo: wrote {out / 'report.json'}, {out / 'alpha_over_training.png'}, "
        f"{out / 'gamma_sweep.png'}"
    )
    return report


def before_after_table(report: dict[str, Any]) -> str:
    before, after = report["before"], report["after"]
    rows = [
        ("alpha (greedy, T=0)", f"{before['alpha_t0']:.3f}", f"{after['alpha_t0']:.3f}"),
        ("alpha (sampled, T=1)", f"{before['alpha_t1']:.3f}", f"{after['alpha_t1']:.3f}"),
        ("best gamma", str(before["best"]["gamma"]), str(after["best"]["gamma"])),
        (
            "tau at best gamma",
            f"{before['best']['block_efficiency']:.2f}",
            f"{after['best']['block_efficiency']:.2f}",
        ),
        (
            "target alone tok/s",
            f"{before['target_tokens_per_s']:.1f}",
            f"{after['target_tokens_per_s']:.1f}",
        ),
        (
            "SD tok/s at best gamma",
            f"{before['best']['sd_tokens_per_s']:.1f}",
            f"{after['best']['sd_tokens_per_s']:.1f}",
        ),
        (
            "SD speed-up vs target alone",
            f"{before['best']['speedup']:.2f}×",
            f"{after['best']['speedup']:.2f}×",
        ),
    ]
    lines = [
        "| held-out chat prompts, greedy, batch 1 | before | after distillation |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {b} | {a} |" for name, b, a in rows]
    return "\n".join(lines)

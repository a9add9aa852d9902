"""``distillspec demo``: choose a draft, measure it, distil it, measure again, on the embedded default.

1. Validate the inputs and claim the output folder (``--fresh`` removes only what a demo wrote).
2. Training data (``tools.demo_data``): the target writes its own user prompts (Magpie) and
   answers them greedily, and answers ``--extra-prompts`` (written requests,
   ``builtin:chat-pool``) greedily too, with ``--answer-samples`` answers sampled at T = 1 to
   every prompt beside; each part is generated once, in batches, and cached. Greedy SD is
   verified along exactly such trajectories. The held-out prompts stay the hand-written
   ``builtin:chat:heldout`` (choice) and ``builtin:chat:train`` (report), apart from both
   training parts.
3. The draft: ``--draft auto`` measures the cost ratio c of each candidate (the target's first
   N layers with a pruned K-token head) and takes the best predicted speed-up at one planning
   alpha with the measured verify curve (``choose_draft``); the report says why.
4. Measure before, distil within ``--minutes`` (``training.loop.distill``; the target's top-k on
   the cached answers is scored once and cached beside them, so steps run no target forward),
   measure after:
   alpha (T=0, T=1) and a greedy batch-1 sweep of gamma and adaptive thresholds against the
   target alone, side by side (``decoding.measure``); on a CPU the best setting again with the
   draft as loaded and as int8, side by side (``--draft-quantize auto``); the chosen setting
   on the report split; at ``--sampled-temperature`` the fastest chain and every tree again,
   the fastest of them on the report split too. Report, plots, and the fastest measured
   settings (greedy and sampled) and weights saved in the draft folder, which ``distillspec
   generate --draft auto`` follows.

Over 350 lines because the four phases share one report and one folder claim; each phase is a
function here, and the measurement itself lives in ``decoding.measure``.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillspec.common.config import changed_flags, replace, to_dict
from distillspec.common.io import atomic_write_json, read_jsonl
from distillspec.common.rundir import claim
from distillspec.common.runtime import apply_threads, cpu_name, load_options
from distillspec.decoding.measure import (
    CostModel,
    SpeedProbe,
    Sweep,
    measure_cost_model,
    setting_label,
)
from distillspec.decoding.metrics import (
    describe_agreement,
    describe_round_speedups,
    predicted_speedup,
)
from distillspec.decoding.timing import alternating_rates
from distillspec.models.drafts import split_vocab_option, truncate_layers
from distillspec.models.loading import (
    build_draft,
    eos_token_ids,
    load_model,
    pad_token_id,
)
from distillspec.models.pruned_head import prune_head
from distillspec.models.quantize import quantize_draft
from distillspec.models.recommended import save_recommended
from distillspec.models.registry import record_distilled_draft
from distillspec.tools.configs import DemoConfig
from distillspec.tools.demo_data import answer_vocabulary, demo_data
from distillspec.tools.demo_data import say as _say
from distillspec.training.datasets import load_examples
from distillspec.training.evaluate import SDEvaluator
from distillspec.training.setup import target_dtype

ENTRIES = ("run", "report.json", "alpha_over_training.png", "gamma_sweep.png")
RECIPE_NOTE = (
    "forward KL on the target's cached answers, greedy and --answer-samples at T=1 (top-k scored "
    "once): the greedy winner of the study in docs/results/study (2 min per cell, 1 seed: fkl "
    "0.275 against lk 0.234, jsd 0.227, tvd 0.206, rkl 0.185; on-policy data at most 0.033 at "
    "equal minutes on a CPU); T=1 samples: docs/results/written-prompts-3"
)
# Every draft candidate is priced at this alpha (about what the demo's drafts reach held out on
# a 2-core CPU: 0.35-0.41 with the 1361 written requests); it moves the predicted figures more
# than their order.
PLANNING_ALPHA = 0.4


# -- choosing the draft ----------------------------------------------------------------------------


CHOICE_ROUNDS = 3  # interleaved timing rounds per draft candidate
TIE = 0.03  # predicted speed-ups this close count as equal; the deeper draft is taken
DUEL_ROUNDS = 3  # interleaved rounds of the int8-against-as-loaded duel (Measurement.duel)


def best_predicted(cost: CostModel, cost_ratio: float, gammas: list[int]) -> tuple[float, int]:
    """(predicted speed-up, gamma) at PLANNING_ALPHA for a draft of this c, best gamma."""
    return max((predicted_speedup(PLANNING_ALPHA, g, cost_ratio, cost.verify_cost(g + 1)), g)
               for g in gammas)


def pick_candidate(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The deepest candidate (candidates are in layer order) whose predicted speed-up is within
    TIE of the best: a near-tie is noise on this kind of machine, and depth may still buy alpha."""
    best = max(c["predicted_speedup"] for c in candidates)
    return [c for c in candidates if c["predicted_speedup"] >= best * (1 - TIE)][-1]


def choose_draft(
    config: DemoConfig, target, target_cost: CostModel | None = None
) -> tuple[str, dict[str, Any]]:
    """``--draft auto``: the candidate with the best predicted speed-up from its measured c.

    Every candidate is priced at the same alpha (PLANNING_ALPHA): measured on SmolLM2 with the
    demo's recipe, alpha after a fixed CPU budget hardly grows with depth (3.5 min: 1 / 2 / 4
    layers 0.30 / 0.34 / 0.35), because a shallower draft takes more steps per minute, while c
    grows with every layer. So the measured c decides; within TIE the deeper draft wins.
    """
    if config.draft != "auto":
        return config.draft, {"rule": "given with --draft", "spec": config.draft}
    vocab_size = target.get_input_embeddings().weight.shape[0]
    keep = config.draft_vocab if 0 < config.draft_vocab < vocab_size else 0
    layers = sorted(n for n in config.draft_layers if n < target.config.num_hidden_layers)
    if target_cost is None:  # the demo passes the one it measured already
        target_cost = measure_cost_model(target, None, max_verify=max(config.gammas) + 1)
    drafts = {}
    for count in layers:
        drafts[count] = truncate_layers(target, count)
        if keep:
            prune_head(drafts[count], torch.arange(keep))  # timing does not depend on which ids
    # Rounds over all candidates, each against a target step timed in the same round, so drift
    # on a busy machine hits every candidate alike; the median ratio per candidate decides.
    ratios: dict[int, list[float]] = {count: [] for count in layers}
    steps: dict[int, list[float]] = {count: [] for count in layers}
    for _ in range(CHOICE_ROUNDS):
        target_step = measure_cost_model(target, None, max_verify=1, repeats=5).target_step_s
        for count, draft in drafts.items():
            draft_step = measure_cost_model(draft, None, max_verify=1, repeats=5).target_step_s
            ratios[count].append(draft_step / target_step)
            steps[count].append(draft_step)
    del drafts
    candidates = []
    for count in layers:
        ratio = statistics.median(ratios[count])
        speedup, gamma = best_predicted(target_cost, ratio, config.gammas)
        candidates.append({"layers": count, "draft_step_ms": 1000 * statistics.median(steps[count]),
                           "cost_ratio": ratio, "predicted_speedup": speedup, "gamma": gamma})
    chosen = pick_candidate(candidates)
    spec = f"target-layers:{chosen['layers']}" + (f":vocab={keep}" if keep else "")
    why = (f"{chosen['layers']} layers{f' + a {keep}-token head' if keep else ''}: measured c = "
           f"{chosen['cost_ratio']:.3f}, the deepest of {', '.join(str(n) for n in layers)} "
           f"layers whose predicted speed-up at alpha {PLANNING_ALPHA} is within {TIE:.0%} of the "
           f"best ({chosen['predicted_speedup']:.2f}x at gamma {chosen['gamma']}, best "
           f"{max(c['predicted_speedup'] for c in candidates):.2f}x; verify curve measured here); "
           "alpha after a fixed budget hardly grows with depth, c does")
    return spec, {"rule": "auto", "spec": spec, "why": why, "planning_alpha": PLANNING_ALPHA,
                  "candidates": candidates, "target_step_ms": 1000 * target_cost.target_step_s,
                  "verify_curve": target_cost.to_dict()["verify_curve"]}


# -- measuring -------------------------------------------------------------------------------------


class Measurement:
    """alpha and a greedy batch-1 sweep on the choice split, for any draft; the chosen setting
    timed again, with alpha, on the report split (prompts neither trained nor chosen on)."""

    def __init__(self, config: DemoConfig, target, tokenizer, splits: Splits):
        recipe = config.distill
        choice, report = splits.choice, splits.report
        pad_id, eos = pad_token_id(tokenizer), eos_token_ids(target, tokenizer)
        self.config, self.report_prompts = config, report

        def evaluator(prompts):
            return SDEvaluator(target, prompts, max_new_tokens=config.max_new_tokens, tau_prompts=0,
                               gamma=config.gammas[0], eos_token_id=eos, seed=recipe.seed,
                               pad_id=pad_id)

        self.evaluator = evaluator(choice[: recipe.eval_prompts])
        self.report_evaluator = evaluator(report)
        self.probe = SpeedProbe(target, choice[: config.speed_prompts],
                                max_new_tokens=config.max_new_tokens, pad_id=pad_id)
        self.report_probe = SpeedProbe(target, report, max_new_tokens=config.max_new_tokens,
                                       pad_id=pad_id)
        self.sampled_probes = None  # (choice, report) at --sampled-temperature
        if config.sampled_temperature > 0:
            self.sampled_probes = tuple(
                SpeedProbe(target, prompts, max_new_tokens=config.max_new_tokens, pad_id=pad_id,
                           temperature=config.sampled_temperature, seed=recipe.seed)
                for prompts in (choice[: config.speed_prompts], report))
        # The verify curve reaches the widest call measured: the longest chain or tree + 1.
        self.cost = measure_cost_model(target, None, max_verify=verify_width(config))

    def check_training_prompts(self, training: list[list[int]], source: str) -> None:
        """The report split must not hold a prompt the draft is trained on."""
        _check_apart(self.report_prompts, training, f"--report-data {self.config.report_data}",
                     f"the training data ({source})")

    def measure(self, draft, label: str, thresholds: list[float],
                lookup: int = 0) -> dict[str, Any]:
        """The choice split: alpha, and every setting timed against the target alone (each
        tree also with ``lookup`` prompt lookup tokens, when > 0)."""
        start = time.perf_counter()
        alpha = self.evaluator.alpha(draft)
        # A threshold cannot change a 1-token draft (it stops after that token anyway): at
        # gamma 1 it would only add a second sample of the same computation.
        settings = [(g, t, "") for t in thresholds for g in self.config.gammas if t == 0 or g > 1]
        settings += [(1, 0.0, tree) for tree in self.config.tree_shapes]
        if lookup:
            settings += [(1, 0.0, tree, lookup) for tree in self.config.tree_shapes]
        _say(f"{label}: alpha_t0 {alpha['alpha_t0']:.3f}; timing {len(settings)} settings x "
             f"{self.config.repeats} rounds on {len(self.probe.batches)} choice prompts against "
             "the target alone ...")
        sweep = self.probe.sweep(draft, settings, self.config.repeats, self.cost,
                                 progress=lambda message: _say(f"  {label}: {message}"))
        return {**alpha, **_summary(sweep), "measure_seconds": time.perf_counter() - start}

    def duel(self, drafts: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        """The chosen setting (``row``) decoded on the choice split with each of ``drafts``
        (``none``: as loaded, ``int8``), DUEL_ROUNDS rounds in alternating order after a
        warm-up. Side by side, because two sweeps timed minutes apart differ by as much as
        the int8 step saves (the machine drifts). tokens/s per round and median, the ratio
        int8 ÷ none, and the int8 draft's alpha."""
        start = time.perf_counter()
        setting = _as_setting(row)
        alpha = self.evaluator.alpha(drafts["int8"])
        _say(f"weights: the int8 draft's alpha_t0 {alpha['alpha_t0']:.3f}; timing {setting_label(row)} "
             f"with each weights x {DUEL_ROUNDS} rounds on {len(self.probe.batches)} choice "
             "prompts ...")
        def decode(draft) -> Callable[[], int]:
            return lambda: sum(len(s) for r in self.probe.speculative(draft, *setting)
                               for s in r.sequences)

        for draft in drafts.values():
            self.probe.speculative(draft, *setting, batches=1)  # warm-up, discarded
        rates = alternating_rates({name: decode(d) for name, d in drafts.items()}, DUEL_ROUNDS,
                                  self.probe.device, warmup=False)
        medians = {name: statistics.median(values) for name, values in rates.items()}
        return {"setting": setting_label(row), "rounds": DUEL_ROUNDS, "tokens_per_s": rates,
                "median_tokens_per_s": medians, "int8_over_none": medians["int8"] / medians["none"],
                "int8_alpha_t0": alpha["alpha_t0"], "int8_alpha_t1": alpha["alpha_t1"],
                "measure_seconds": time.perf_counter() - start}

    def report(self, draft, row: dict[str, Any]) -> dict[str, Any]:
        """The chosen setting (``row``, from the choice split) on the report split: alpha, and
        its speed against the target alone, ``report_repeats`` interleaved rounds."""
        start = time.perf_counter()
        alpha = self.report_evaluator.alpha(draft)
        _say(f"report split: alpha_t0 {alpha['alpha_t0']:.3f}; timing {setting_label(row)} x "
             f"{self.config.report_repeats} rounds on {len(self.report_probe.batches)} prompts "
             "it was not chosen on ...")
        return {"data": self.config.report_data, "prompts": len(self.report_prompts), **alpha,
                **self._timed_again(self.report_probe, draft, row),
                "measure_seconds": time.perf_counter() - start}

    def _timed_again(self, probe: SpeedProbe, draft, row: dict[str, Any]) -> dict[str, Any]:
        """The setting of ``row`` timed against the target alone on ``probe``'s prompts,
        ``report_repeats`` interleaved rounds: the target's tokens/s and the setting's row."""
        summary = _summary(probe.sweep(draft, [_as_setting(row)], self.config.report_repeats,
                                       self.cost))
        return {"target_tokens_per_s": summary["target_tokens_per_s"], "setting": summary["best"]}

    def sampled(self, draft, after: dict[str, Any]) -> dict[str, Any] | None:
        """At --sampled-temperature (None when 0): the fastest greedy chain and every tree
        (again with --lookup unless 0) timed on the choice split (a tree: the multi-draft rule
        on sampled candidates; lookup: a copied token kept with probability p(token)), the
        fastest of them timed again on the report split. The greedy choice does not carry
        over: a sampled step costs more and accepts less (alpha_t1 < alpha_t0)."""
        if self.sampled_probes is None:
            return None
        start, config = time.perf_counter(), self.config
        choice_probe, report_probe = self.sampled_probes
        chain = fastest_chain(after)
        settings = [(chain["gamma"], chain.get("confidence_threshold", 0.0), "", 0)]
        lookups = (0, config.lookup) if config.lookup else (0,)
        settings += [(1, 0.0, tree, k) for k in lookups for tree in config.tree_shapes]
        label = f"T={config.sampled_temperature:g}"
        _say(f"{label}: timing {len(settings)} settings x {config.repeats} rounds on "
             f"{len(choice_probe.batches)} choice prompts against the target alone ...")
        chosen = _summary(choice_probe.sweep(draft, settings, config.repeats, self.cost,
                                             progress=lambda m: _say(f"  {label}: {m}")))
        best = chosen["best"]
        _say(f"{label}: {setting_label(best)} ran {best['speedup']:.2f}x; timing it x "
             f"{config.report_repeats} rounds on {len(report_probe.batches)} report prompts ...")
        return {"temperature": config.sampled_temperature, "choice": chosen,
                "report": self._timed_again(report_probe, draft, best),
                "measure_seconds": time.perf_counter() - start}


def _as_setting(row: dict[str, Any]) -> tuple[int, float, str, int]:
    """A summary row as the ``(gamma, threshold, tree, lookup)`` a sweep takes ('' = chain,
    0 = no prompt lookup)."""
    return (row["gamma"], row.get("confidence_threshold", 0.0), row.get("tree") or "",
            row.get("lookup", 0))


def fastest_chain(measured: dict[str, Any]) -> dict[str, Any]:
    """The fastest chain (no tree, no lookup) of a sweep summary: what runs when the tree is
    turned off."""
    return max((r for r in measured["all"] if not r.get("tree") and not r.get("lookup")),
               key=lambda r: r["sd_tokens_per_s"])


@dataclass
class Splits:
    """The demo's evaluation prompts: ``choice`` (alpha during training and the choice of the
    setting) and ``report`` (the chosen setting reported), checked apart before anything runs."""

    choice: list[list[int]]
    report: list[list[int]]

    @classmethod
    def load(cls, config: DemoConfig, tokenizer) -> Splits:
        recipe = config.distill
        choice = _prompts(recipe.eval_data, tokenizer, recipe.max_prompt_tokens)
        choice = choice[: max(recipe.eval_prompts, config.speed_prompts)]
        report = _prompts(config.report_data, tokenizer, recipe.max_prompt_tokens)
        report = report[: config.report_prompts]
        _check_apart(report, choice, f"--report-data {config.report_data}",
                     f"--distill.eval-data {recipe.eval_data}")
        # Training prompts known before anything runs or is removed (a pool is checked later).
        if not config.prompt_pool:
            _check_apart(report, _prompts(recipe.data, tokenizer, recipe.max_prompt_tokens),
                         f"--report-data {config.report_data}", f"--distill.data {recipe.data}")
        if config.extra_prompts != "none":
            try:
                extra = _prompts(config.extra_prompts, tokenizer, recipe.max_prompt_tokens)
            except ValueError as error:
                raise ValueError(f"--extra-prompts {config.extra_prompts}: {error} "
                                 "(--extra-prompts none trains on the pool alone)") from None
            _check_apart(report, extra, f"--report-data {config.report_data}",
                         f"--extra-prompts {config.extra_prompts}")
        return cls(choice, report)


def _prompts(spec: str, tokenizer, max_prompt_tokens: int) -> list[list[int]]:
    return [list(e.prompt_ids) for e in
            load_examples(spec, tokenizer, max_prompt_tokens=max_prompt_tokens)]


def _check_apart(report: list[list[int]], other: list[list[int]], name: str, other_name: str):
    """A ValueError when a report-split prompt also appears in ``other`` (a choice or training
    split): a figure reported on prompts it was chosen or trained on is not a held-out figure."""
    shared = {tuple(p) for p in report} & {tuple(p) for p in other}
    if shared:
        raise ValueError(
            f"{len(shared)} of the {len(report)} report prompts ({name}) are also in "
            f"{other_name}. The report split must hold prompts the draft was neither trained nor "
            "chosen on: pass another --report-data."
        )


def split_agreement(after: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    """How far the choice and report splits agree: alpha and the chosen setting's speed-up on
    each, and report ÷ choice (1 = the choice split's figures hold on unseen prompts)."""
    chosen = after["best"]
    return {
        "alpha_t0": {"choice": after["alpha_t0"], "report": reported["alpha_t0"],
                     "ratio": reported["alpha_t0"] / max(after["alpha_t0"], 1e-9)},
        "alpha_t1": {"choice": after["alpha_t1"], "report": reported["alpha_t1"],
                     "ratio": reported["alpha_t1"] / max(after["alpha_t1"], 1e-9)},
        "speedup": {"choice": chosen["speedup"], "report": reported["setting"]["speedup"],
                    "ratio": reported["setting"]["speedup"] / chosen["speedup"]},
    }


def _reported_speedup(setting: dict[str, Any]) -> str:
    """``1.27× (τ 1.42; per round 1.25× (1.10–1.40))``: the ratio of the medians, then the
    per-round ratios (``describe_round_speedups``; reports written before them: without)."""
    text = f"{setting['speedup']:.2f}× (τ {setting['block_efficiency']:.2f}"
    if setting.get("speedup_rounds"):
        text += f"; per round {describe_round_speedups(setting)}"
    return text + ")"


def _summary(sweep: Sweep) -> dict[str, Any]:
    rows = [
        {"gamma": r.gamma, "confidence_threshold": r.confidence_threshold, "tree": r.tree,
         "lookup": r.lookup, "sd_tokens_per_s": r.tokens_per_s, "block_efficiency": r.block_efficiency,
         "acceptance_rate": r.acceptance_rate, "analytic_alpha": r.analytic_alpha,
         "speedup": r.speedup, "cost_ratio": r.cost_ratio, "verify_cost": r.verify_cost,
         "predicted_speedup": r.predicted_speedup,
         "measured_over_predicted": r.measured_over_predicted, "agreement": r.agreement,
         "speedup_rounds": r.speedup_rounds, "speedup_round_median": r.speedup_round_median}
        for r in sweep.rows
    ]
    fixed = [r for r in rows if r["confidence_threshold"] == 0 and not r["tree"]] or rows
    best = max(rows, key=lambda r: r["sd_tokens_per_s"])
    return {"target_tokens_per_s": sweep.plain_tokens_per_s, "by_gamma": fixed, "all": rows,
            "best": best, "best_fixed": max(fixed, key=lambda r: r["sd_tokens_per_s"]),
            "cost_model": sweep.cost_model.to_dict() if sweep.cost_model else None}


# -- the run ---------------------------------------------------------------------------------------


def _check_inputs(config: DemoConfig) -> None:
    from distillspec.models.loading import check_model_spec
    from distillspec.training.setup import check_data, check_inputs

    check_inputs(replace(config.distill, draft_init="target-layers:1"))
    check_data(config.report_data, "report data (--report-data)")
    if config.draft != "auto":
        check_model_spec(config.draft)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    started = time.perf_counter()
    apply_threads(config.runtime)
    _check_inputs(config)  # before anything is written or removed
    runtime, recipe = config.runtime, config.distill
    torch.manual_seed(recipe.seed)
    target, tokenizer = load_model(recipe.target, **load_options(runtime))
    splits = Splits.load(config, tokenizer)  # refuses overlapping splits, also before removing
    out = claim(config.out, "demo", fresh=config.fresh)
    out.track(*ENTRIES)
    run_dir = out.child("run")
    report_path = out.child("report.json")
    previous = json.loads(report_path.read_text()) if report_path.is_file() else None
    reuse = previous is not None and (run_dir / "final").is_dir()
    measurement = Measurement(config, target, tokenizer, splits)
    data, data_info = _training_data(config, target, tokenizer, previous if reuse else None)
    if config.prompt_pool:  # without a pool, Splits.load checked the training prompts already
        measurement.check_training_prompts(
            _prompts(data_info["prompts"], tokenizer, recipe.max_prompt_tokens),
            data_info["prompts"])
    if reuse:
        before, choice = previous["before"], previous["draft"]
    else:
        before, choice = _measure_and_distil(config, target, tokenizer, measurement, data, run_dir)
        data_info["scoring_minutes"] = _scoring_seconds(run_dir) / 60
    distilled, _ = load_model(run_dir / "final", device=target.device, dtype=target.dtype)
    after = measurement.measure(distilled, "after", [0.0, *[t for t in config.confidence_thresholds
                                                            if t > 0]], config.lookup)
    distilled, duel, weights = _faster_draft(config, target, measurement, distilled, after)
    record_distilled_draft(recipe.target, run_dir / "final")
    reported = measurement.report(distilled, after["best"])
    sampled = measurement.sampled(distilled, after)
    _save_setting(recipe, run_dir, after, reported, target, weights, sampled)
    evals = _evals(run_dir)
    report = {
        "command": ("distillspec demo " + changed_flags(config)).strip(),
        "config": to_dict(config),
        "target": recipe.target,
        "draft": choice,
        "data": data_info,
        "dtype": str(target.dtype),
        "device": str(target.device),
        "cpu": cpu_name(),
        "train_minutes": evals[-1].get("train_seconds", 0) / 60 if evals else None,
        "train_steps": evals[-1]["step"] if evals else None,
        "wall_minutes": (time.perf_counter() - started) / 60,
        "recipe": RECIPE_NOTE,
        "before": before,
        "after": after,
        "weights_duel": duel,
        "draft_weights": weights,
        "report_split": reported,
        "split_agreement": split_agreement(after, reported),
        "sampled": sampled,
        "evals": evals,
    }
    atomic_write_json(report_path, report)
    _show(report, out, run_dir, report_path)
    return report


def _training_data(config: DemoConfig, target, tokenizer,
                   previous: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """The demo's training data and what the report says of it; ``previous``: the last run's
    report, whose distilled draft is reused (no data is needed then)."""
    if previous is not None:
        _say("reusing the distilled draft from the last run (--fresh starts over)")
        return None, previous["data"]
    data = demo_data(config, target, tokenizer)
    return data, {"prompts": str(data.prompts), "answers": str(data.answers),
                  "extra_prompts": config.extra_prompts,
                  "generated_now_minutes": data.seconds / 60,
                  "generation_minutes": data.generation_minutes}


def _measure_and_distil(config: DemoConfig, target, tokenizer, measurement: Measurement, data,
                        run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Choose the draft, measure it undistilled, distil it into ``run_dir``; returns the
    before-measurement and the choice."""
    from distillspec.training.loop import distill

    recipe = config.distill
    spec, choice = choose_draft(config, target, measurement.cost)
    _say(f"draft: {choice.get('why', spec)}")
    _say(f"plan: measure the undistilled draft, distil for {config.minutes:g} min, measure "
         "the distilled one; each measurement says how long it has left")
    keep = split_vocab_option(spec)[1]
    eos = eos_token_ids(target, tokenizer)
    vocab = target.get_input_embeddings().weight.shape[0]
    ids = answer_vocabulary(data, keep, eos, vocab) if keep else None
    undistilled = build_draft(spec, target, tokenizer, token_ids=ids)
    before = measurement.measure(undistilled, "before", [0.0])
    before["report_split"] = measurement.report_evaluator.alpha(undistilled)
    del undistilled
    scoring = (f"the target first scores the answers once (its top-{recipe.teacher_topk} per "
               "token, cached beside them), then " if recipe.teacher_topk else "")
    _say(f"{scoring}distilling for {config.minutes:g} minutes, then measuring again "
         f"(~{before['measure_seconds'] / 60 * _after_sweeps(config, target):.1f} min) ...")
    policy_data = str(data.answers) if recipe.policy == "fixed" else str(data.prompts)
    # The target's top-k on the cached answers is scored once and kept beside them, so a
    # --fresh demo (or another draft size) on the same data does not score it again.
    training = replace(recipe, data=policy_data, draft_init=spec, max_minutes=config.minutes,
                       output_dir=str(run_dir),
                       teacher_topk_dir=recipe.teacher_topk_dir or str(data.answers.parent))
    # The target loaded above, not a second copy, unless training wants it in another
    # dtype (e.g. --dtype float32 on a CPU where training autocasts to bf16).
    shared = target.dtype == target_dtype(training, target.device)
    distill(training, target=target if shared else None, tokenizer=tokenizer if shared else None)
    return before, choice


def _faster_draft(config: DemoConfig, target, measurement: Measurement, distilled,
                  after: dict[str, Any]) -> tuple[Any, dict[str, Any] | None, str]:
    """On a CPU (``measures_int8``), the distilled draft as loaded against a copy with int8
    weights, in a duel at the best setting: (the faster draft, the duel or None, its weights)."""
    if not measures_int8(config, target):
        return distilled, None, "none"
    quantized = quantize_draft(copy.deepcopy(distilled), "int8")
    duel = measurement.duel({"none": distilled, "int8": quantized}, after["best"])
    weights = faster_weights(duel)
    return (quantized if weights == "int8" else distilled), duel, weights


def _save_setting(recipe, run_dir: Path, after: dict[str, Any], reported: dict[str, Any],
                  target, weights: str, sampled: dict[str, Any] | None) -> None:
    """Save the distilled draft's fastest measured setting, greedy and (``sampled``) at the
    sampling temperature, and the faster draft ``weights`` (int8 or none), beside it."""
    best = after["best"]
    # The saved chain is the fastest chain measured, whichever won overall: what runs when the
    # tree is turned off (--tree ''). Without a sampled timing, the tree also runs sampled rows.
    chain = fastest_chain(after)
    save_recommended(
        run_dir / "final", target=recipe.target, gamma=chain["gamma"],
        confidence_threshold=chain.get("confidence_threshold", 0.0), tree=best.get("tree", ""),
        lookup=best.get("lookup", 0), draft_quantize=weights, device=target.device,
        # The report split's figure decides whether `generate` uses the draft: the choice
        # split's is biased upwards by the choice itself.
        dtype=target.dtype, measured={"speedup": reported["setting"]["speedup"],
                                      "choice_speedup": best["speedup"],
                                      "alpha_t0": reported["alpha_t0"],
                                      "cost_model": after["cost_model"]},
        sampled=_sampled_setting(sampled),
    )


def _sampled_setting(sampled: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``save_recommended`` keeps of ``Measurement.sampled``: the chain timed (gamma,
    threshold), the tree and prompt lookup if they won, the report split's speed-up (it
    decides whether generate speculates at T > 0) and the choice split's."""
    if sampled is None:
        return None
    chain, best = fastest_chain(sampled["choice"]), sampled["choice"]["best"]
    return {"temperature": sampled["temperature"], "gamma": chain["gamma"],
            "confidence_threshold": chain.get("confidence_threshold", 0.0),
            "tree": best.get("tree", ""), "lookup": best.get("lookup", 0),
            "speedup": sampled["report"]["setting"]["speedup"],
            "choice_speedup": best["speedup"]}


def _show(report: dict[str, Any], out, run_dir: Path, report_path: Path) -> None:
    """The plots, the before/after table and what ``generate`` will do now."""
    from distillspec.tools.plots import plot_alpha_over_training, plot_gamma_sweep

    before, after, evals = report["before"], report["after"], report["evals"]
    plot_alpha_over_training(evals, out.child("alpha_over_training.png"))
    plot_gamma_sweep(before["by_gamma"], after["by_gamma"], out.child("gamma_sweep.png"))
    print(before_after_table(report))
    held_out = report["report_split"]["setting"]["speedup"]
    if held_out >= 1.0:
        use = "`distillspec generate` now uses this draft"
    else:  # auto_draft reads the saved setting and keeps plain decoding here
        use = (f"SD measured {held_out:.2f}x the target alone on the report split, so `distillspec "
               f"generate` keeps plain decoding on this machine (--draft {run_dir / 'final'} "
               "uses the draft anyway)")
    sampled = report.get("sampled")
    if sampled:
        at_t = sampled["report"]["setting"]["speedup"]
        use += (f"; at T={sampled['temperature']:g} it ran {at_t:.2f}x there, so sampled "
                f"`generate` {'uses it' if at_t >= 1.0 else 'keeps plain decoding'}")
    _say(f"wrote {report_path} and plots in {out.path} after {report['wall_minutes']:.1f} min; "
         f"{use}")


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [record for _, record in read_jsonl(path)] if path.is_file() else []


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in _records(run_dir) if "eval" in r]


def _before_settings(config: DemoConfig) -> int:
    """Settings the before-measurement times: every gamma fixed, and every tree."""
    return len(config.gammas) + len(config.trees)


def _after_settings(config: DemoConfig) -> int:
    """Settings the after-measurement times: every gamma fixed, each threshold > 0 at every
    gamma > 1, and every tree, with prompt lookup too where --lookup is set (the
    before-measurement skips the thresholds and lookup)."""
    thresholds = [t for t in config.confidence_thresholds if t > 0]
    return (len(config.gammas) + len(thresholds) * len([g for g in config.gammas if g > 1])
            + len(config.trees) * (2 if config.lookup else 1))


def verify_width(config: DemoConfig) -> int:
    """The most tokens one verify call scores among the settings measured (the chain's gamma +
    1, a tree's nodes + 1): the verify curve is measured up to there."""
    return max([max(config.gammas) + 1, *(tree.size + 1 for tree in config.tree_shapes)])


def _after_sweeps(config: DemoConfig, target) -> float:
    """The after-measurement's length in before-measurements (in settings timed on the choice
    split; each setting's share of the target alone's runs is folded in): more settings, on a
    CPU the weights duel (2 drafts x DUEL_ROUNDS runs of the chosen setting), the report split
    (its rounds on its prompts), and the sampled timing with its own report split. demo-xeon-3:
    14.1 min predicted from its before-measurement, 14.7 measured."""
    repeats = max(config.repeats, 1)
    duel = 2 * DUEL_ROUNDS / repeats if measures_int8(config, target) else 0
    report = config.report_repeats * config.report_prompts / (config.speed_prompts * repeats)
    sampled = 1 + len(config.trees) + report if config.sampled_temperature > 0 else 0
    return (_after_settings(config) + duel + report + sampled) / _before_settings(config)


def measures_int8(config: DemoConfig, target) -> bool:
    """Whether the demo also times the distilled draft with int8 weights: on a CPU (the int8
    kernels are CPU only) under --draft-quantize auto, not --deterministic (which refuses
    int8 drafts) and not none (the user keeps the weights as loaded)."""
    runtime = config.runtime
    return (runtime.draft_quantize == "auto" and not runtime.deterministic
            and target.device.type == "cpu")


def faster_weights(duel: dict[str, Any] | None) -> str:
    """int8 when the int8 draft decoded faster than the draft as loaded in the weights duel
    (``Measurement.duel``), else none (also when no duel ran)."""
    return "int8" if duel is not None and duel["int8_over_none"] > 1.0 else "none"


def _scoring_seconds(run_dir: Path) -> float:
    """Seconds the run spent before training on the target's data (its top-k scored now, or
    completions generated); 0 when it found them cached."""
    steps = [r for r in _records(run_dir) if "loss" in r]
    return steps[-1].get("data_seconds", 0.0) if steps else 0.0


def _weights_row(report: dict[str, Any]) -> tuple[str, str, str]:
    """The table row of the draft weights the demo saved, with the duel that chose them."""
    duel = report.get("weights_duel")
    if duel is None:
        return ("draft weights", "as loaded", "as loaded (int8 not measured)")
    chosen = "int8" if report["draft_weights"] == "int8" else "as loaded"
    return ("draft weights (the faster in a duel at the best setting)", "as loaded",
            f"{chosen}: int8 ran {duel['int8_over_none']:.2f}× the as-loaded draft's tokens/s "
            f"({duel['rounds']} interleaved rounds)")


def before_after_table(report: dict[str, Any]) -> str:
    before, after = report["before"], report["after"]
    best_b, best_a = before["best"], after["best"]
    rows = [
        ("draft", report["draft"]["spec"], report["draft"]["spec"]),
        ("alpha (greedy, T=0)", f"{before['alpha_t0']:.3f}", f"{after['alpha_t0']:.3f}"),
        ("alpha (sampled, T=1)", f"{before['alpha_t1']:.3f}", f"{after['alpha_t1']:.3f}"),
        ("best setting (measured)", setting_label(best_b), setting_label(best_a)),
        ("tau at best setting", f"{best_b['block_efficiency']:.2f}",
         f"{best_a['block_efficiency']:.2f}"),
        ("target alone tok/s", f"{before['target_tokens_per_s']:.1f}",
         f"{after['target_tokens_per_s']:.1f}"),
        ("SD tok/s at best setting", f"{best_b['sd_tokens_per_s']:.1f}",
         f"{best_a['sd_tokens_per_s']:.1f}"),
        ("SD speed-up vs target alone", f"{best_b['speedup']:.2f}×", f"{best_a['speedup']:.2f}×"),
        ("SD output = the target's own greedy output (rows)",
         describe_agreement(best_b.get("agreement")), describe_agreement(best_a.get("agreement"))),
        ("best fixed γ: speed-up (predicted)",
         f"{before['best_fixed']['speedup']:.2f}× ({before['best_fixed']['predicted_speedup']:.2f}×)",
         f"{after['best_fixed']['speedup']:.2f}× ({after['best_fixed']['predicted_speedup']:.2f}×)"),
    ]
    if report.get("draft_weights") is not None:  # reports made before it have none
        rows.append(_weights_row(report))
    reported = report.get("report_split")
    if reported:
        split_before = before.get("report_split", {})
        rows += [
            (f"report split ({reported['prompts']} prompts): alpha T=0 / T=1",
             f"{split_before['alpha_t0']:.3f} / {split_before['alpha_t1']:.3f}"
             if split_before else "not measured",
             f"{reported['alpha_t0']:.3f} / {reported['alpha_t1']:.3f}"),
            ("report split: speed-up at the chosen setting", "not measured",
             _reported_speedup(reported["setting"])),
        ]
    sampled = report.get("sampled")
    if sampled:  # reports made before it, or with --sampled-temperature 0, have none
        chosen, label = sampled["choice"]["best"], f"T={sampled['temperature']:g}"
        rows += [
            (f"{label}: fastest setting on the choice split", "not measured",
             f"{setting_label(chosen)}: {chosen['speedup']:.2f}× (τ {chosen['block_efficiency']:.2f})"),
            (f"{label}: report split, speed-up at that setting", "not measured",
             _reported_speedup(sampled["report"]["setting"])),
        ]
    prompts = report.get("config", {}).get("speed_prompts", "")
    lines = [
        f"| greedy, batch 1; choice split: {prompts} held-out chat prompts | before | after "
        "distillation |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {b} | {a} |" for name, b, a in rows]
    if "why" in report["draft"]:
        lines += ["", f"Draft chosen by measured cost: {report['draft']['why']}."]
    return "\n".join(lines)

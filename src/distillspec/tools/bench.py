"""``distillspec bench``: our speculative decoding against the anchors, side by side in one run.

For a target/draft pair and a prompt set, at each temperature and batch size:

* ``ours``: the target alone and SD at every (gamma, confidence threshold), through
  ``decoding.measure.SpeedProbe.sweep`` (warm-up, target-alone runs interleaved, medians):
  tokens/s, tau, alpha, acceptance, the measured c, the predicted speed-up from the cost model
  measured on this machine (``measure_cost_model``: draft step, verify curve) and
  measured / predicted;
* ``hf_plain``: the target alone through ``transformers`` ``generate``;
* ``hf_assisted``: ``transformers`` assisted generation with the same draft and a fixed gamma
  (``num_assistant_tokens_schedule="constant"``, confidence threshold 0). It is batch-1 only:
  at batch > 1 it is reported as unsupported.

The recommended setting is the fastest measured one. Output: JSON, a Markdown table and PNG
plots; with ``--question-file``, Spec-Bench answer files for our SD and for the target alone.
bench.json and bench.md are rewritten after every finished setting (``"complete": false`` until
the end), so a stopped bench keeps what it measured, and a rerun of the same command continues.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distillspec.common.config import to_dict
from distillspec.common.io import atomic_write_json, atomic_write_text
from distillspec.common.rundir import claim
from distillspec.common.runtime import apply_threads, cpu_name, machine_kind, pair_options
from distillspec.decoding.generate import autoregressive_generate, speculative_generate
from distillspec.decoding.measure import (
    SpeedProbe,
    compare_step_paths,
    measure_cost_model,
    setting_label,
)
from distillspec.decoding.metrics import describe_agreement, describe_round_speedups
from distillspec.decoding.timing import timed
from distillspec.models.compilation import apply_compile, record_verdict
from distillspec.models.pruned_head import full_vocabulary, is_pruned
from distillspec.models.quantize import draft_quantization
from distillspec.tools.configs import BenchConfig

REPORTS = ("bench.json", "bench.md", "bench.png", "answers-sd.jsonl", "answers-baseline.jsonl")


class HFRunner:
    """transformers' own decoding of the same batches (plain, and assisted at batch 1)."""

    def __init__(self, target, draft, probe: SpeedProbe, temperature: float, max_new_tokens: int,
                 eos: list[int] | None, pad_id: int, seed: int):
        self.target, self.draft, self.probe = target, draft, probe
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.eos, self.pad_id, self.seed = eos, pad_id, seed

    def _kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                      eos_token_id=self.eos or None)
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def plain(self) -> int:
        torch.manual_seed(self.seed)
        outputs = [self.target.generate(input_ids=i, attention_mask=m, **self._kwargs())
                   for i, m in self.probe.batches]
        return self._count(outputs)

    def static_compiled(self) -> int:
        """The target alone through ``generate`` with a static cache and its own compilation
        (transformers compiles on CPU only when asked: ``_compile_all_devices``)."""
        from transformers import CompileConfig

        compile_config = CompileConfig(
            mode="reduce-overhead" if self.target.device.type == "cuda" else "default")
        compile_config._compile_all_devices = True
        torch.manual_seed(self.seed)
        outputs = [self.target.generate(input_ids=i, attention_mask=m, cache_implementation="static",
                                        compile_config=compile_config, **self._kwargs())
                   for i, m in self.probe.batches]
        return self._count(outputs)

    def assisted(self, gamma: int) -> int:
        config = self.draft.generation_config
        config.num_assistant_tokens = gamma
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        torch.manual_seed(self.seed)
        outputs = [
            self.target.generate(input_ids=i, attention_mask=m, assistant_model=self.draft,
                                 **self._kwargs())
            for i, m in self.probe.batches
        ]
        return self._count(outputs)

    def _count(self, outputs) -> int:
        """New tokens, each row cut after its first EOS (generate pads finished rows)."""
        total = 0
        for output, (input_ids, _) in zip(outputs, self.probe.batches):
            for row in output[:, input_ids.shape[1] :].tolist():
                if self.eos:
                    stops = [i for i, t in enumerate(row) if t in self.eos]
                    row = row[: stops[0] + 1] if stops else row
                total += len(row)
        return total


def _throughput(run: Callable[[], int], repeats: int, device) -> dict[str, Any]:
    run()  # warm-up
    walls, tokens = [], 0
    for _ in range(repeats):
        wall, tokens = timed(run, device=device)
        walls.append(wall)
    median = statistics.median(walls)
    return {"tokens_per_s": tokens / median, "median_wall_s": median, "new_tokens": tokens,
            "repeats_wall_s": walls}


def bench_setting(probe: SpeedProbe, hf: HFRunner, config: BenchConfig, batch_size: int,
                  cost_model, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every method at one (temperature, batch size)."""
    settings = [(g, t, "") for g in config.gammas for t in config.confidence_thresholds]
    # every tree serves greedy and sampled rows (sampled: the multi-draft rule on draws
    # without replacement)
    settings += [(tree.depth, 0.0, tree) for tree in config.tree_shapes]
    sweep = probe.sweep(
        hf.draft, settings, config.repeats, cost_model,
        progress=lambda message: progress(f"  {message}"),
    )
    progress("  transformers plain" + (" and assisted generation at each gamma" if batch_size == 1
                                       else "") + f" ({config.repeats} repeats each) ...")
    hf_plain = _throughput(hf.plain, config.repeats, probe.device)
    hf_static = None
    if config.compile != "off" and batch_size == 1:
        progress("  transformers static cache + torch.compile (its first call compiles) ...")
        try:
            hf_static = _throughput(hf.static_compiled, config.repeats, probe.device)
        except Exception as error:  # noqa: BLE001 - reported, not fatal: "where it runs"
            hf_static = {"error": f"{type(error).__name__}: {error}"[:300]}
    rows, assisted_by_gamma, exported_by_gamma = [], {}, {}
    for row in sweep.to_dict()["rows"]:
        row["speedup_vs_hf_plain"] = row["tokens_per_s"] / hf_plain["tokens_per_s"]
        gamma = row["gamma"]
        if batch_size == 1:
            # a tree row (its gamma = the tree's depth) is set against assisted at that gamma
            if gamma not in assisted_by_gamma:
                assisted_by_gamma[gamma] = _throughput(
                    lambda g=gamma: hf.assisted(g), config.repeats, probe.device)
            assisted = assisted_by_gamma[gamma]
            row["hf_assisted"] = assisted
            row["ours_over_hf_assisted"] = row["tokens_per_s"] / assisted["tokens_per_s"]
            if is_pruned(hf.draft):  # what other engines get: the full-vocabulary export
                if gamma not in exported_by_gamma:
                    with full_vocabulary(hf.draft):
                        exported_by_gamma[gamma] = _throughput(
                            lambda g=gamma: hf.assisted(g), config.repeats, probe.device)
                exported = exported_by_gamma[gamma]
                row["hf_assisted_full_vocab_export"] = exported
                row["ours_over_hf_assisted_export"] = (row["tokens_per_s"]
                                                       / exported["tokens_per_s"])
        else:
            row["hf_assisted"] = None
            row["hf_assisted_note"] = ("transformers assisted generation supports batch size 1 "
                                       "only; compare ours with hf_plain at this batch size")
        rows.append(row)
    best = max(rows, key=lambda r: r["tokens_per_s"])
    return {
        "batch_size": batch_size,
        "temperature": probe.temperature,
        "ours_plain_tokens_per_s": sweep.plain_tokens_per_s,
        "hf_plain": hf_plain,
        "hf_static_compiled_plain": hf_static,
        "rows": rows,
        "recommended": {"gamma": best["gamma"], "confidence_threshold": best["confidence_threshold"],
                        "tree": best["tree"]},
    }


def _compile_paths(config: BenchConfig, target, draft, command: str,
                   progress: Callable[[str], None]) -> tuple[list[dict[str, Any]], str | None]:
    """With --compile auto/on: every model's steps timed eager and compiled side by side, the
    verdicts recorded for --compile auto elsewhere; (the step paths, why compiling failed)."""
    if config.compile == "off":
        return [], None
    progress("bench: timing each model's steps eager and compiled; the first compiled calls "
             "compile every width (seconds per width for a small model, up to a minute for a "
             "30-layer one on a 2-core CPU with a cold cache) ...")
    try:
        paths, _ = compare_step_paths(target, draft, max_verify=max(config.gammas) + 1)
    except (RuntimeError, ValueError) as error:  # e.g. no C++ compiler for inductor
        if config.compile == "on":
            raise
        compile_error = f"{type(error).__name__}: {error}"[:300]
        progress(f"bench: compiled steps do not run here ({compile_error}); eager only")
        return [], compile_error
    for path in paths:
        record_verdict(target if path.role == "target" else draft,
                       {**path.to_dict(), "command": command})
    return [path.to_dict() for path in paths], None


def run_bench(config: BenchConfig, target, draft, tokenizer, prompts: list[list[int]],
              progress: Callable[[str], None] = print, *,
              earlier: list[dict[str, Any]] = (),
              on_setting: Callable[[dict[str, Any]], None] | None = None,
              models: dict[str, str] | None = None) -> dict[str, Any]:
    """Every (temperature, batch size) setting, each a side-by-side comparison of its own.
    ``earlier``: settings a stopped run of the same command finished (kept, not measured
    again); ``on_setting`` gets the report so far ('complete': false) after each setting;
    ``models``: the pair's ``models_fingerprint`` where the caller has it already."""
    from distillspec.models.loading import eos_token_ids, pad_token_id

    eos = eos_token_ids(target, tokenizer) if config.stop_at_eos else None
    pad_id = pad_token_id(tokenizer)
    command = "distillspec bench " + _flags(config)
    step_paths, compile_error = _compile_paths(config, target, draft, command, progress)
    mode = "off" if compile_error else config.compile
    decisions = apply_compile(mode, target=target, draft=draft)  # batch 1; per setting below
    for decision in decisions:
        progress(f"bench: {decision.describe()}")
    progress("bench: measuring the cost model (draft step, verify curve) ...")
    widest = max([max(config.gammas) + 1, *(tree.size + 1 for tree in config.tree_shapes)])
    cost_model = measure_cost_model(target, draft, max_verify=widest)
    report = {
        "command": command, "config": to_dict(config), "device": str(target.device),
        "dtype": str(target.dtype), "machine": machine_kind(target.device),
        "draft_weights": draft_quantization(draft),  # int8 with --draft-quantize int8
        "cpu": cpu_name(), "num_prompts": len(prompts), "cost_model": cost_model.to_dict(),
        "models": models or models_fingerprint(target, draft),
        "step_paths": step_paths, "compile": [decision.describe() for decision in decisions],
        "compile_error": compile_error, "complete": False, "settings": [],
    }
    kept = {(s["temperature"], s["batch_size"]): s for s in earlier}
    grid = [(t, b) for t in config.temperatures for b in config.batch_sizes]
    for number, (temperature, batch_size) in enumerate(grid, 1):
        if (temperature, batch_size) in kept:
            progress(f"bench: setting {number}/{len(grid)}: temperature {temperature:g}, batch "
                     f"{batch_size}: kept from the stopped run (--no-resume measures it again)")
            report["settings"].append({**kept[temperature, batch_size], "kept_from_earlier_run": True})
            continue
        progress(f"bench: setting {number}/{len(grid)}: temperature {temperature:g}, "
                 f"batch {batch_size} ...")
        probe = SpeedProbe(target, prompts, max_new_tokens=config.max_new_tokens,
                           batch_size=batch_size, temperature=temperature, eos_token_id=eos,
                           pad_id=pad_id, seed=config.seed)
        hf = HFRunner(target, draft, probe, temperature, config.max_new_tokens, eos, pad_id,
                      config.seed)
        # the same rule as generate: auto's verdicts are batch-1 figures
        chosen = apply_compile(mode, batch_size, target=target, draft=draft)
        setting = bench_setting(probe, hf, config, batch_size, cost_model, progress)
        # each setting's predictions used this process's cost model: kept ones carry theirs
        report["settings"].append({**setting, "compile": [d.describe() for d in chosen],
                                   "cost_model": report["cost_model"]})
        if on_setting is not None:
            on_setting(report)
    return {**report, "complete": True}


def models_fingerprint(target, draft) -> dict[str, str]:
    """What identifies the weights measured, cheaply: per model, its parameter count and the
    float64 sum of its parameters and buffers (int8 weights included), and the draft's
    weights mode. A resumed bench keeps earlier settings only with the same fingerprint."""
    def one(model) -> str:
        tensors = [*model.parameters(), *model.buffers()]
        with torch.no_grad():
            total = sum(float(t.detach().double().sum()) for t in tensors)
        return f"{sum(t.numel() for t in tensors)}:{total:.9e}"

    return {"target": one(target), "draft": one(draft),
            "draft_weights": draft_quantization(draft)}


def earlier_settings(config: BenchConfig, path: Path, target,
                     models: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
    """The settings a stopped run of this same command (every knob but --resume equal) on this
    machine kind and dtype, with the same weights (``models``, the pair's ``models_fingerprint``),
    finished, from its partial ``path`` (bench.json), and what the bench does with them; none
    with --no-resume, or when the run there finished or measured something else."""
    try:
        earlier = json.loads(path.read_text()) if config.resume and path.is_file() else {}
    except (OSError, ValueError):
        earlier = {}
    if not isinstance(earlier, dict) or earlier.get("complete", True):
        return [], ""
    now = json.loads(json.dumps({**to_dict(config), "resume": None}))
    then = earlier.get("config")
    if not isinstance(then, dict) or {**then, "resume": None} != now:
        return [], (f"bench: {path} holds a stopped run of another command; measuring every "
                    "setting again")
    if (earlier.get("machine"), earlier.get("dtype")) != (machine_kind(target.device),
                                                          str(target.dtype)):
        return [], (f"bench: {path}'s stopped run measured on {earlier.get('machine')} in "
                    f"{earlier.get('dtype')}; measuring every setting again here")
    if earlier.get("models") != models:
        return [], (f"bench: {path}'s stopped run measured other weights (a draft retrained "
                    "or quantized since?); measuring every setting again")
    listed = earlier.get("settings")
    settings = [s for s in (listed if isinstance(listed, list) else [])
                if isinstance(s, dict) and {"temperature", "batch_size", "rows",
                                            "recommended"} <= s.keys()]
    return settings, (f"bench: resuming the stopped run in {path}: its {len(settings)} finished "
                      "setting(s) are kept (--no-resume measures them again)")


def _flags(config: BenchConfig) -> str:
    from distillspec.common.config import changed_flags

    return changed_flags(config)


# -- reports -------------------------------------------------------------------------------------


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| T | batch | gamma | threshold | ours SD tok/s | ours plain | HF plain | HF assisted "
        "| SD ÷ plain | per round | SD ÷ HF assisted | alpha | tau | c | V(γ+1) | predicted "
        "| measured ÷ predicted | SD = plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in report["settings"]:
        for row in setting["rows"]:
            assisted = row["hf_assisted"]
            best = setting["recommended"]
            star = " ★" if (row["gamma"], row["confidence_threshold"], row.get("tree", "")) == (
                best["gamma"], best["confidence_threshold"], best.get("tree", "")) else ""
            gamma = f"tree {row['tree']}" if row.get("tree") else str(row["gamma"])
            assisted_tps = f"{assisted['tokens_per_s']:.1f}" if assisted else "batch-1 only"
            versus = f"{row['ours_over_hf_assisted']:.2f}×" if assisted else "–"
            lines.append(
                f"| {setting['temperature']:g} | {setting['batch_size']} | {gamma}{star} "
                f"| {row['confidence_threshold']:g} | {row['tokens_per_s']:.1f} "
                f"| {setting['ours_plain_tokens_per_s']:.1f} "
                f"| {setting['hf_plain']['tokens_per_s']:.1f} | {assisted_tps} "
                f"| {row['speedup']:.2f}× | {describe_round_speedups(row)} | {versus} "
                f"| {row['analytic_alpha']:.3f} "
                f"| {row['block_efficiency']:.2f} | {row['cost_ratio']:.2f} "
                f"| {row['verify_cost']:.2f} | {row['predicted_speedup']:.2f}× "
                f"| {row['measured_over_predicted']:.2f} | {describe_agreement(row.get('agreement'))} |"
            )
    lines += ["", "★ = recommended setting (highest measured tokens/s) for that temperature and "
              "batch. SD ÷ plain: of the medians over rounds; per round: the median (and "
              "range) of SD ÷ plain within each round, the methods' order rotated per round. "
              "V(γ+1) = measured cost of a (γ+1)-token target call ÷ a one-token step (a tree: of "
              "its nodes + 1; its prediction is the measured tau ÷ (depth × c + V)). SD = plain "
              "(greedy): the share of rows where SD's output equals our plain decoding's token for "
              "token, in this run's dtype, and the mean position of the first difference where "
              "one differs (always 100 % in float32; bf16 can flip near-tied logits)."]
    kept = [f"T {s['temperature']:g} batch {s['batch_size']}" for s in report["settings"]
            if s.get("kept_from_earlier_run")]
    if kept:
        lines.append(f"\nKept from a stopped run of the same command: {', '.join(kept)}.")
    if not report.get("complete", True):
        lines.append("\n**Partial**: the bench stopped (or is still running) after these "
                     "settings; rerun the same command to measure the rest.")
    return "\n".join(lines + step_path_table(report)) + "\n"


def step_path_table(report: dict[str, Any]) -> list[str]:
    """Eager vs compiled step times per model and width, and what the run then used."""
    if not report.get("step_paths"):
        return []
    lines = ["", "| model | tokens per call | eager ms | compiled ms | eager ÷ compiled |",
             "|---|---|---|---|---|"]
    for path in report["step_paths"]:
        for width, eager in path["eager_ms"].items():
            compiled = path["compiled_ms"][width]
            lines.append(f"| {path['role']} | {width} | {eager:.1f} | {compiled:.1f} "
                         f"| {eager / compiled:.2f} |")
        lines.append(f"| {path['role']}: geometric mean | | | | **{path['gain']:.2f}** "
                     f"(first calls: {path['compile_s']:.0f} s) |")
    for setting in report["settings"]:
        exported = {}  # timed once per gamma: one line each, against our fastest row there
        for row in setting["rows"]:
            if row.get("hf_assisted_full_vocab_export"):
                fastest = exported.get(row["gamma"])
                if fastest is None or row["tokens_per_s"] > fastest["tokens_per_s"]:
                    exported[row["gamma"]] = row
        for gamma, row in exported.items():
            lines.append(
                f"\nT {setting['temperature']:g}, γ {gamma}: transformers assisted with the "
                f"draft's full-vocabulary export: "
                f"{row['hf_assisted_full_vocab_export']['tokens_per_s']:.1f} tok/s (ours with the "
                f"pruned draft at γ {gamma}, fastest {setting_label(row)}, ÷ that: "
                f"{row['ours_over_hf_assisted_export']:.2f}×)")
    static = [s["hf_static_compiled_plain"] for s in report["settings"]
              if s.get("hf_static_compiled_plain")]
    for entry in static:
        figure = (f"{entry['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in entry
                  else entry.get("error", "?"))
        lines.append(f"\ntransformers static cache + compile, target alone, batch 1: {figure}")
    return lines + ["", "This run at batch 1: " + "; ".join(report.get("compile", []))]


def write_reports(report: dict[str, Any], out_dir: Path) -> list[Path]:
    from distillspec.tools.plots import plot_bench

    atomic_write_json(out_dir / "bench.json", report)
    atomic_write_text(out_dir / "bench.md", markdown_table(report))
    return [out_dir / "bench.json", out_dir / "bench.md", *plot_bench(report, out_dir)]


# -- Spec-Bench question / answer files ------------------------------------------------------------


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """Spec-Bench ``question.jsonl``: ``{"question_id", "category", "turns": [str, ...]}``."""
    from distillspec.common.io import read_jsonl

    questions = []
    for line_number, record in read_jsonl(path):
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(
                f'{path}:{line_number}: a Spec-Bench question needs "turns": a non-empty list '
                "of strings."
            )
        questions.append({"question_id": record.get("question_id", line_number),
                          "category": record.get("category", ""), "turns": turns})
    return questions


def _render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The conversation so far with the chat template, or plain turns when there is none."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def answer_questions(questions, target, draft, tokenizer, *, gamma: int | None,
                     max_new_tokens: int, temperature: float, model_id: str,
                     seed: int) -> list[dict[str, Any]]:
    """Answer every turn (batch 1, chat template, history kept across turns) with our SD, or
    with the target alone when ``gamma`` is None, in Spec-Bench's answer schema:
    per turn ``wall_time`` and ``new_tokens``; ``accept_lengths`` one flat list of the tokens
    each target call produced (what Spec-Bench's ``speed.py`` averages)."""
    from distillspec.models.loading import eos_token_ids

    eos = eos_token_ids(target, tokenizer)
    generator = torch.Generator(device=target.device).manual_seed(seed)
    answers = []
    for question in questions:
        messages, turns, wall, new_tokens, accept_lengths = [], [], [], [], []
        for turn in question["turns"]:
            messages.append({"role": "user", "content": turn})
            text = _render(tokenizer, messages)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            common = dict(max_new_tokens=max_new_tokens, temperature=temperature,
                          eos_token_id=eos, generator=generator)
            if gamma is None:
                result = autoregressive_generate(target, ids.to(target.device), **common)
                lengths = [1] * len(result.sequences[0])
            else:
                result = speculative_generate(target, draft, ids.to(target.device), gamma=gamma,
                                              **common)
                lengths = [n + 1 for n in result.metrics.rows[0].accepted_lengths]
            reply = tokenizer.decode(result.sequences[0], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})
            turns.append(reply)
            wall.append(result.metrics.wall_time_s)
            new_tokens.append(len(result.sequences[0]))
            accept_lengths.extend(lengths)
        answers.append({
            "question_id": question["question_id"], "category": question["category"],
            "model_id": model_id, "tstamp": time.time(),
            "choices": [{"index": 0, "turns": turns, "wall_time": wall,
                         "new_tokens": new_tokens, "accept_lengths": accept_lengths}],
        })
    return answers


# -- entry point ---------------------------------------------------------------------------------


def load_prompts_for_bench(config: BenchConfig, tokenizer) -> list[list[int]]:
    from distillspec.training.datasets import load_examples

    examples = load_examples(config.prompts, tokenizer, max_prompt_tokens=config.max_prompt_tokens)
    return [e.prompt_ids for e in examples[: config.num_prompts]]


def bench_main(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Validate, claim the output folder, load the pair, run every setting, write the reports."""
    from distillspec.models.loading import check_model_spec, load_pair

    progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    apply_threads(config.runtime)
    check_model_spec(config.target, config.runtime.allow_download)
    if config.question_file:
        read_questions(config.question_file)
    out = claim(config.out, "bench")
    out.track(*REPORTS)
    runtime = config.runtime
    target, draft, tokenizer = load_pair(config.target, config.draft, **pair_options(runtime))
    models = models_fingerprint(target, draft)
    earlier, note = earlier_settings(config, out.path / "bench.json", target, models)
    if note:
        progress(note)

    def save_so_far(partial: dict[str, Any]) -> None:  # a stopped bench keeps these
        atomic_write_json(out.path / "bench.json", partial)
        atomic_write_text(out.path / "bench.md", markdown_table(partial))

    report = run_bench(config, target, draft, tokenizer, load_prompts_for_bench(config, tokenizer),
                       progress, earlier=earlier, on_setting=save_so_far, models=models)
    if config.question_file:
        progress("bench: answering the Spec-Bench questions (SD, then the target alone) ...")
        questions = read_questions(config.question_file)
        gamma = report["settings"][0]["recommended"]["gamma"]
        common = dict(max_new_tokens=config.max_new_tokens, temperature=0.0, seed=config.seed)
        files = {
            "answers-sd.jsonl": answer_questions(questions, target, draft, tokenizer, gamma=gamma,
                                                 model_id=f"distillspec-sd-gamma{gamma}", **common),
            "answers-baseline.jsonl": answer_questions(questions, target, None, tokenizer,
                                                       gamma=None, model_id="distillspec-baseline",
                                                       **common),
        }
        for name, answers in files.items():
            atomic_write_text(out.child(name), "".join(json.dumps(a) + "\n" for a in answers))
        report["answer_files"] = {name: str(out.path / name) for name in files}
    write_reports(report, out.path)
    print(markdown_table(report))
    progress(f"bench: wrote {out.path}/bench.json, bench.md, bench.png")
    return report


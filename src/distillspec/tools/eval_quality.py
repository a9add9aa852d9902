"""``distillspec eval``: task quality beside speed, for each decoding setup the engine offers.

For every setup (``tools/eval_config.py``: the target alone, SD at gamma, lossy SD, adaptive
drafting, trees) the same rows (problems or prompts x samples, each with its own seed) are
decoded through the engine (``Decoder`` + ``run_to_completion``, the one generate path), timed,
and scored:

* speed: tokens/s (the tokens each answer keeps ÷ the synchronised wall time of its runs),
  the ratio to the ``target`` setup, and for SD tau, acceptance rate and analytic alpha;
* code (``--task code``): each answer is cut at the first new top-level statement and run with
  its problem's unit tests in the sandbox (``tools/sandbox.py``); pass@k by Chen et al.'s
  unbiased estimator (``decoding/quality.py``);
* every task: the target's mean log-likelihood of each answer (teacher-forced by the target,
  unwarped, nats per token, averaged per answer then over answers), and agreement with the
  target's own greedy answer to the same prompt (the fraction identical token for token, the
  mean position of the first difference). The greedy answers are the ``target`` setup's at
  temperature 0, else one extra untimed greedy run of the target.

Writes eval.json (config, sandbox isolation, every figure), samples.jsonl (every answer with its
scores) and eval.md into an output folder it owns (``common/rundir.claim``).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from distillspec.common.config import changed_flags, to_dict
from distillspec.common.io import atomic_write_json, atomic_write_text
from distillspec.common.rundir import claim
from distillspec.common.runtime import (
    apply_threads,
    cpu_name,
    draft_weights_option,
    load_options,
    pair_options,
    refuse_draft_quantize,
)
from distillspec.decoding.engine import Decoder
from distillspec.decoding.generate import GenerationResult, run_to_completion
from distillspec.decoding.metrics import combined_counts
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.quality import (
    agreement,
    mean_pass_at_k,
    mean_per_token,
    paired_difference,
    truncate_at_stops,
)
from distillspec.decoding.requests import Request, RowUpdate
from distillspec.decoding.timing import SyncTimer
from distillspec.tools.code_problems import STOP_SEQUENCES, CodeProblem, load_problems
from distillspec.tools.eval_config import EvalConfig, EvalSetup
from distillspec.tools.sandbox import check_sandbox, run_many

REPORTS = ("eval.json", "eval.md", "samples.jsonl")
PLOTS = {"draft": "quality_speed.png", "compare": "quality_speed_compare.png"}
WARMUP_TOKENS = 8
SCORE_BATCH = 4  # rows per teacher-forced forward when scoring log-likelihoods


@dataclass
class Item:
    """One prompt of the eval: a problem (code) or a prompt (text)."""

    key: str  # task_id, or the prompt's source
    prompt_ids: list[int]
    problem: CodeProblem | None = None


@dataclass
class Row:
    """One answer to produce: sample ``sample`` of item ``item``, with its own seed."""

    item: int
    sample: int
    seed: int


@dataclass
class Answer:
    tokens: list[int]  # what the answer keeps (code: up to the token completing the stop)
    emitted: int  # tokens the engine emitted for it
    text: str  # the decoded answer (code: cut before the stop sequence)
    finish: str  # eos, length or stop


@dataclass
class SetupRun:
    setup: EvalSetup
    answers: list[Answer]
    results: list[GenerationResult]

    @property
    def wall_s(self) -> float:
        return sum(result.metrics.wall_time_s for result in self.results)


class StopWatcher:
    """Cancels a row as soon as its completion text holds a stop sequence (code answers end at
    the next top-level statement) and remembers how many tokens it took to get there."""

    def __init__(self, decoder: Decoder, tokenizer, prompts: Sequence[list[int]],
                 stops: Sequence[str]):
        self.decoder, self.tokenizer, self.stops = decoder, tokenizer, stops
        self.prompts = list(prompts)
        self.prompt_text = [self._decode(p) for p in self.prompts]
        self.tokens: dict[int, list[int]] = {i: [] for i in range(len(self.prompts))}
        self.cut: dict[int, int] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def completion(self, index: int, tokens: list[int]) -> str:
        """The answer's text as it continues the prompt (decoded together: exact spacing)."""
        return self._decode(self.prompts[index] + tokens)[len(self.prompt_text[index]):]

    def _stopped(self, index: int, tokens: list[int]) -> bool:
        text = self.completion(index, tokens)
        return any(stop in text for stop in self.stops)

    def update(self, update: RowUpdate) -> None:
        index = update.request_id
        tokens = self.tokens[index]
        before = len(tokens)
        tokens += update.new_tokens
        if index in self.cut or not update.new_tokens or not self._stopped(index, tokens):
            return
        self.cut[index] = next(end for end in range(before + 1, len(tokens) + 1)
                               if self._stopped(index, tokens[:end]))
        if not update.finished:
            self.decoder.cancel(index)


def decode_rows(target, draft, setup: EvalSetup, items: Sequence[Item], rows: Sequence[Row], *,
                tokenizer, sampling: SamplingConfig, max_new_tokens: int, batch_size: int,
                stop_ids: frozenset[int], stops: Sequence[str], seed: int) -> SetupRun:
    """Decode ``rows`` with ``setup`` in batches of ``batch_size`` through the engine."""
    answers: list[Answer] = []
    results: list[GenerationResult] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        generator = torch.Generator(device=target.device).manual_seed(seed + start)
        decoder = Decoder(target, draft if setup.uses_draft else None, setup.speculation,
                          generator=generator, probe=SyncTimer(target.device))
        prompts = [items[row.item].prompt_ids for row in chunk]
        requests = [Request(list(prompt), max_new_tokens, sampling, stop_ids, seed=row.seed)
                    for prompt, row in zip(prompts, chunk)]
        watcher = StopWatcher(decoder, tokenizer, prompts, stops) if stops else None
        result = run_to_completion(decoder, requests,
                                   on_update=watcher.update if watcher else None)
        results.append(result)
        for index, (tokens, reason) in enumerate(zip(result.sequences,
                                                     result.metrics.finish_reasons)):
            if watcher is None:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                answers.append(Answer(tokens, len(tokens), text, reason))
                continue
            stopped = index in watcher.cut
            kept = tokens[:watcher.cut[index]] if stopped else tokens
            text = truncate_at_stops(watcher.completion(index, kept), stops)
            answers.append(Answer(kept, len(tokens), text, "stop" if stopped else reason))
    return SetupRun(setup, answers, results)


@torch.inference_mode()
def target_log_likelihoods(target, prompts: Sequence[list[int]], answers: Sequence[list[int]],
                           pad_id: int, batch_size: int = SCORE_BATCH) -> list[list[float]]:
    """log p_target(y_t | x, y_<t) for every token of every answer (teacher-forced, unwarped
    logits, float32 log-softmax); an empty answer gives an empty list."""
    from distillspec.training.batch import build_batch

    scores: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk_prompts = prompts[start:start + batch_size]
        chunk_answers = answers[start:start + batch_size]
        if not any(chunk_answers):
            scores += [[] for _ in chunk_answers]
            continue
        batch = build_batch(chunk_prompts, chunk_answers, pad_id).to(target.device)
        keep = batch.scored_columns()
        logits = target(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, logits_to_keep=keep).logits
        following = torch.nn.functional.pad(batch.input_ids[:, 1:], (0, 1))[:, -keep:]
        mask = batch.loss_mask[:, -keep:] > 0
        for row in range(len(chunk_prompts)):
            log_probs = logits[row].float().log_softmax(dim=-1)
            picked = log_probs.gather(-1, following[row].unsqueeze(-1)).squeeze(-1)
            scores.append(picked[mask[row]].tolist())
    return scores


def _speed(run: SetupRun, target_tps: float | None) -> dict[str, Any]:
    kept = sum(len(answer.tokens) for answer in run.answers)
    emitted = sum(answer.emitted for answer in run.answers)
    wall = run.wall_s
    counts = combined_counts(run.results)
    spec = run.setup.speculation
    tokens_per_s = kept / wall if wall > 0 else None
    return {
        "setup": run.setup.label,
        "draft_role": (None if not run.setup.uses_draft
                       else "compare" if run.setup.compare else "draft"),
        "kind": ("target" if spec is None else "lookup" if run.setup.draftless
                 else "tree" if spec.tree else "sd"),
        "lookup": spec.lookup if spec is not None else None,
        "gamma": spec.gamma if run.setup.uses_draft and not spec.tree else None,
        "tree": spec.tree if spec is not None and spec.tree else None,
        "lenience": spec.lenience if spec is not None else None,
        "epsilon": spec.epsilon if spec is not None else None,
        "confidence_threshold": spec.confidence_threshold if spec is not None else None,
        "wall_s": wall,
        "draft_time_s": sum(result.metrics.draft_time_s for result in run.results),
        "target_time_s": sum(result.metrics.target_time_s for result in run.results),
        "prefill_time_s": sum(result.metrics.prefill_time_s for result in run.results),
        "kept_tokens": kept,
        "emitted_tokens": emitted,
        "tokens_per_s": tokens_per_s,
        "emitted_tokens_per_s": emitted / wall if wall > 0 else None,
        "speedup_vs_target": (tokens_per_s / target_tps
                              if tokens_per_s is not None and target_tps else None),
        "block_efficiency": counts.block_efficiency if spec is not None else None,
        "acceptance_rate": counts.acceptance_rate if spec is not None else None,
        "analytic_alpha": counts.analytic_alpha if spec is not None else None,
        "finish_reasons": dict(Counter(answer.finish for answer in run.answers)),
    }


def _rows(items: Sequence[Item], samples: int, seed: int) -> list[Row]:
    return [Row(item, sample, seed + item * samples + sample)
            for item in range(len(items)) for sample in range(samples)]


def run_eval(config: EvalConfig, target, draft, tokenizer, items: Sequence[Item],
             progress: Callable[[str], None] = print, sandbox: dict | None = None,
             compare=None) -> dict[str, Any]:
    """Decode, time and score every setup (see the module docstring); returns the report.
    ``compare``: the --compare-draft model, which drafts the setups marked ``compare``."""
    from distillspec.models.loading import eos_token_ids, pad_token_id

    setups = config.parsed_setups()
    code = config.task == "code"
    stops = STOP_SEQUENCES if code else ()
    common = dict(tokenizer=tokenizer, max_new_tokens=config.new_tokens,
                  batch_size=config.batch_size, stop_ids=frozenset(eos_token_ids(target, tokenizer)),
                  stops=stops, seed=config.seed)
    rows = _rows(items, config.samples, config.seed)
    runs: list[SetupRun] = []
    for number, setup in enumerate(setups, 1):
        progress(f"eval: setup {number}/{len(setups)} {setup.label}: decoding {len(rows)} "
                 f"rows of up to {config.new_tokens} tokens ...")
        drafter = compare if setup.compare else draft
        if config.warmup:
            decode_rows(target, drafter, setup, items, rows[:1], sampling=config.sampling,
                        **{**common, "max_new_tokens": min(WARMUP_TOKENS, config.new_tokens)})
        runs.append(decode_rows(target, drafter, setup, items, rows, sampling=config.sampling,
                                **common))
    reference, source = _reference(runs, config, target, draft, items, common, progress)
    target_run = next((run for run in runs if run.setup.speculation is None), None)
    target_tps = _speed(target_run, None)["tokens_per_s"] if target_run else None
    references = [reference[row.item] for row in rows]
    entries, samples = [], []
    for run in runs:
        progress(f"eval: scoring {run.setup.label} ...")
        entry, lines = _score(run, rows, items, references, config, target,
                              pad_token_id(tokenizer), progress)
        entries.append({**_speed(run, target_tps), **entry})
        samples += lines
    report = {
        "command": "distillspec eval " + changed_flags(config),
        "config": to_dict(config),
        "task": config.task,
        "data": config.data_spec,
        "items": len(items),
        "samples_per_item": config.samples,
        "temperature": config.sampling.temperature,
        "reference": source,
        "device": str(target.device),
        "dtype": str(target.dtype),
        "cpu": cpu_name(),
        "sandbox": {"limits": _limits(config), "isolation": sandbox} if code else None,
        "setups": entries,
        "_samples": samples,
    }
    report["lenience_choice"] = lenience_choice(report, samples, config.quality_tolerance)
    return report


def _limits(config: EvalConfig) -> dict[str, Any]:
    limits = config.sandbox_limits()
    return {**asdict(limits), "cpu_s": limits.cpu_s}


def _score(run: SetupRun, rows, items, references, config: EvalConfig, target, pad_id: int,
           progress) -> tuple[dict[str, Any], list[dict]]:
    """One setup's quality figures (log-likelihood, agreement, pass@k) and its sample lines."""
    prompts = [items[row.item].prompt_ids for row in rows]
    outputs = [answer.tokens for answer in run.answers]
    log_likelihoods = target_log_likelihoods(target, prompts, outputs, pad_id)
    entry: dict[str, Any] = {"mean_log_likelihood": mean_per_token(log_likelihoods),
                             "agreement": agreement(outputs, references).to_dict()}
    executions = None
    if config.task == "code":
        progress(f"eval: running {len(rows)} programs of {run.setup.label} in the sandbox ...")
        executions = run_many([items[row.item].problem.program(answer.text)
                               for row, answer in zip(rows, run.answers)],
                              config.sandbox_limits(), config.workers)
        passed = Counter(row.item for row, ex in zip(rows, executions) if ex.passed)
        per_problem = [(config.samples, passed[i]) for i in range(len(items))]
        entry["pass_at_k"] = {str(k): mean_pass_at_k(per_problem, k) for k in config.pass_k}
        entry["statuses"] = dict(Counter(ex.status for ex in executions))
    return entry, _sample_lines(run, rows, items, log_likelihoods, references, executions)


def _reference(runs, config: EvalConfig, target, draft, items, common, progress):
    """Per item, the target's own greedy answer, and where it came from (at temperature 0 there
    is one sample per item, so the target setup's rows are its items)."""
    for run in runs:
        if run.setup.speculation is None and config.sampling.greedy:
            return [answer.tokens for answer in run.answers], "the target setup (greedy)"
    progress("eval: the target's greedy answers (the agreement reference; untimed) ...")
    plain = EvalSetup("target", None)
    rows = [Row(item, 0, config.seed + item) for item in range(len(items))]
    run = decode_rows(target, draft, plain, items, rows, sampling=SamplingConfig(), **common)
    return [answer.tokens for answer in run.answers], "a separate greedy run of the target"


def _sample_lines(run, rows, items, log_likelihoods, references, executions) -> list[dict]:
    from distillspec.decoding.quality import first_difference

    lines = []
    for index, (row, answer) in enumerate(zip(rows, run.answers)):
        scores = log_likelihoods[index]
        line = {
            "setup": run.setup.label, "key": items[row.item].key, "sample": row.sample,
            "seed": row.seed, "text": answer.text, "tokens": len(answer.tokens),
            "emitted_tokens": answer.emitted, "finish": answer.finish,
            "log_likelihood": sum(scores) / len(scores) if scores else None,
            "first_difference": first_difference(answer.tokens, references[index]),
            "identical_to_greedy": answer.tokens == references[index],
        }
        if executions is not None:
            line.update(status=executions[index].status, detail=executions[index].detail)
        lines.append(line)
    return lines


# -- reports -------------------------------------------------------------------------------------


def _figure(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown_report(report: dict[str, Any]) -> str:
    code = report["task"] == "code"
    ks = list(report["setups"][0].get("pass_at_k", {})) if code else []
    head = ["setup", "tok/s", "÷ target", "τ", "acceptance", "α"]
    head += [f"pass@{k}" for k in ks] + ["log-lik/token", "identical", "first diff"]
    compared = (f" ([compare]: {report['compare_draft']})" if report.get("compare_draft")
                else "")
    lines = [
        f"# distillspec eval: {report['task']} on {report['data']}",
        "",
        f"Target {report['config']['target']}, draft {report.get('draft') or '–'}{compared}; "
        f"{report['items']} items × {report['samples_per_item']} samples, temperature "
        f"{report['temperature']:g}, {report['device']} {report['dtype']}. Agreement "
        f"reference: {report['reference']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for entry in report["setups"]:
        agree = entry["agreement"]
        cells = [
            entry["setup"], _figure(entry["tokens_per_s"], ".1f"),
            _figure(entry["speedup_vs_target"], ".2f", "×"), _figure(entry["block_efficiency"], ".2f"),
            _figure(entry["acceptance_rate"], ".3f"), _figure(entry["analytic_alpha"], ".3f"),
        ]
        cells += [_figure(entry["pass_at_k"][k], ".3f") for k in ks]
        cells += [_figure(entry["mean_log_likelihood"], ".3f"), _figure(agree["exact_match"], ".3f"),
                  _figure(agree["mean_first_difference"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Higher is better or closer to the target everywhere: tok/s counts the tokens each answer "
        "keeps; log-lik/token is the target's mean log-probability of the answer (nats, "
        "teacher-forced); identical is the fraction of answers equal token for token to the "
        "target's greedy answer, first diff the mean length of the common prefix (tokens).",
    ]
    if code and report.get("sandbox"):
        isolation, limits = report["sandbox"]["isolation"] or {}, report["sandbox"]["limits"]
        lines += ["", f"Sandbox (docs/eval.md): network: {isolation.get('network', '?')}; PID "
                  f"namespace: {isolation.get('pid_namespace', '?')}; processes: "
                  f"{limits['max_processes']} ({isolation.get('process_limit', '?')}); "
                  f"{limits['timeout_s']:g} s wall, {limits['cpu_s']} s CPU and "
                  f"{limits['memory_mb']} MiB address space per run."]
    lines += lenience_lines(report) + lenience_choice_lines(report)
    return "\n".join(lines) + "\n"


def lenience_curves(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The lossy-SD curves of an eval report, one per (draft role, drafting setting, lenience
    function): ``{"role", "setting", "base", "lenience", "points"}``, points the setups' entries
    from the strictest ε to the most lenient. Every f is the identity at ε = 1 (p^1 = p/1 = p/1²
    = p), so the lossless entry with the same draft, γ or tree and threshold, when it ran, opens
    the curve as its ε 1 point (``base`` its label, else None)."""
    def setting(entry):
        return (entry["draft_role"], entry["gamma"], entry["tree"], entry["confidence_threshold"])

    def label(entry):
        drafting = f"sd:{entry['gamma']}" if entry["gamma"] is not None else f"tree:{entry['tree']}"
        threshold = entry["confidence_threshold"]
        return drafting + (f":threshold={threshold:g}" if threshold else "")

    lossless = {setting(e): e for e in report["setups"]
                if e["draft_role"] is not None and e["lenience"] == "none"}
    curves: dict[tuple, dict[str, Any]] = {}
    for entry in report["setups"]:
        if entry["draft_role"] is None or entry["lenience"] == "none":
            continue
        key = (*setting(entry), entry["lenience"])
        start = lossless.get(setting(entry))
        curve = curves.setdefault(key, {
            "role": entry["draft_role"], "setting": label(entry), "lenience": entry["lenience"],
            "base": start["setup"] if start else None, "points": [start] if start else []})
        curve["points"].append(entry)
    for curve in curves.values():
        curve["points"].sort(key=lambda entry: -entry["epsilon"])
    return list(curves.values())


def quality_metrics(report: dict[str, Any]) -> list[tuple[str, Callable[[dict], float | None]]]:
    """(label, getter) of the quality figures a lenience plot shows: pass@k (code) and the
    target's log-likelihood per token."""
    metrics = []
    if report["task"] == "code":
        k = next(iter(report["setups"][0]["pass_at_k"]))
        metrics.append((f"pass@{k}", lambda entry: entry["pass_at_k"][k]))
    metrics.append(("log-lik/token", lambda entry: entry["mean_log_likelihood"]))
    return metrics


def _row_quality(report: dict[str, Any]) -> tuple[str, Callable[[dict], float | None]]:
    """The lenience choice's quality and how to read it from one sample line: pass@1 for code
    (passed: 1, else 0; its mean over rows is pass@1 whatever --pass-k asks), else the target's
    log-likelihood per token (None for an empty answer)."""
    if report["task"] == "code":
        return "pass@1", lambda line: float(line.get("status") == "passed")
    return "log-lik/token", lambda line: line.get("log_likelihood")


def lenience_choice(report: dict[str, Any], samples: Sequence[dict],
                    tolerance: float) -> list[dict[str, Any]]:
    """Per lossless setup that opens a lenience curve (one draft and drafting setting): the
    fastest lossy setup of its curves (by tok/s) that is faster than it and whose quality
    (``_row_quality``'s, averaged over the rows of ``samples``, samples.jsonl's lines) is at
    most ``tolerance`` below its own; ``chosen`` None when none is (``why`` says so). With a
    choice, ``paired`` is the difference chosen − lossless per item (prompt or problem: its
    rows matched by sample index and seed, averaged), with its interval over items: samples of
    one problem are not independent, so the items are the units.

    Chosen on the eval's own rows, so its ÷ lossless is optimistic (the maximum of noisy
    figures): confirm it with ``--setups LOSSLESS,CHOSEN`` on other data."""
    name, per_row = _row_quality(report)
    by_setup: dict[str, dict[tuple, float]] = {}
    for line in samples:
        value = per_row(line)
        if value is not None:
            by_setup.setdefault(line["setup"], {})[(line["key"], line["sample"])] = value
    qualities = {setup: sum(rows.values()) / len(rows) for setup, rows in by_setup.items()}
    groups: dict[str, tuple[str, list[dict]]] = {}  # lossless label -> (role, lossy entries)
    for curve in lenience_curves(report):
        if curve["base"] is not None:
            groups.setdefault(curve["base"], (curve["role"], []))[1].extend(curve["points"][1:])
    labelled = {entry["setup"]: entry for entry in report["setups"]}
    choices = []
    for base_label, (role, lossy) in groups.items():
        base = labelled[base_label]
        record = {"role": role, "lossless": base_label, "metric": name, "tolerance": tolerance,
                  "candidates": len(lossy), "chosen": None}
        base_quality, base_speed = qualities.get(base_label), base["tokens_per_s"]
        if base_quality is None or not base_speed:
            record["why"] = "the lossless setup has no quality or speed to compare with"
            choices.append(record)
            continue
        eligible = [e for e in lossy if (e["tokens_per_s"] or 0.0) > base_speed
                    and qualities.get(e["setup"], -math.inf) >= base_quality - tolerance]
        chosen = max(eligible, key=lambda e: e["tokens_per_s"], default=None)
        if chosen is None:
            record["why"] = f"none of {len(lossy)} is faster within the tolerance"
            choices.append(record)
            continue
        record.update(
            chosen=chosen["setup"], speedup_vs_lossless=chosen["tokens_per_s"] / base_speed,
            tau=(chosen["block_efficiency"], base["block_efficiency"]),
            quality=(qualities[chosen["setup"]], base_quality),
            paired=_paired_by_item(by_setup[chosen["setup"]], by_setup[base_label]))
        choices.append(record)
    return choices


def _paired_by_item(values: dict[tuple, float], baselines: dict[tuple, float]) -> dict | None:
    """``paired_difference`` over items (keys) of each item's mean value against its mean
    baseline, on the rows (key, sample) both have; None when they share none."""
    per_item: dict[str, list[tuple[float, float]]] = {}
    for row, value in values.items():
        if row in baselines:
            per_item.setdefault(row[0], []).append((value, baselines[row]))
    if not per_item:
        return None
    means = [[sum(side) / len(pairs) for side in zip(*pairs)] for pairs in per_item.values()]
    item_values, item_baselines = zip(*means)
    rows = sum(map(len, per_item.values()))
    return {**paired_difference(item_values, item_baselines).to_dict(), "rows": rows,
            "items": len(means)}


def lenience_choice_lines(report: dict[str, Any]) -> list[str]:
    """eval.md's lenience-choice section (from ``report["lenience_choice"]``)."""
    choices = report.get("lenience_choice")
    if not choices:
        return []
    lines = ["", "## Lenience choice", "",
             f"Per draft and setting, the fastest lossy setup that is faster than lossless SD "
             f"and whose {choices[0]['metric']} is at most {choices[0]['tolerance']:g} below "
             "lossless SD's (`--quality-tolerance`). Paired: chosen − lossless on the same "
             "prompts and seeds, averaged per item, mean over items [95 % interval over items, "
             "normal approximation]. **Chosen on these rows**, so its ÷ lossless is the best of "
             "several noisy figures: confirm it on other data with `--setups LOSSLESS,CHOSEN`.",
             "",
             "| draft | lossless setup | chosen (of lossy setups) | ÷ lossless | τ | quality, chosen "
             "vs lossless | paired difference |", "|---|---|---|---|---|---|---|"]
    for record in choices:
        head = f"| {record['role']} | {record['lossless']} |"
        if record["chosen"] is None:
            lines.append(f"{head} {record['why']} | – | – | – | – |")
            continue
        paired = record["paired"]
        interval = ("–" if paired is None or paired["low"] is None
                    else f"[{paired['low']:+.3f}, {paired['high']:+.3f}]")
        tau = " vs ".join(_figure(value, ".2f") for value in record["tau"])
        quality = " vs ".join(_figure(value, ".3f") for value in record["quality"])
        lines.append(f"{head} {record['chosen']} (of {record['candidates']}) | "
                     f"{record['speedup_vs_lossless']:.2f}× | {tau} | {quality} | "
                     f"{_figure(paired and paired['mean'], '+.3f')} {interval} "
                     f"({paired['items'] if paired else 0} items, "
                     f"{paired['rows'] if paired else 0} rows) |")
    return lines


def lenience_lines(report: dict[str, Any]) -> list[str]:
    """eval.md's lenience section: per curve, ε → ÷ target, τ and quality."""
    curves = lenience_curves(report)
    if not curves:
        return []
    metrics = quality_metrics(report)
    flags = {"draft": "--draft", "compare": "--compare-draft"}
    lines = ["", "## Lenience curves", "",
             "One curve per draft, drafting setting and lenience function f, by falling ε; the "
             "lossless setup of the same setting (ε 1, where every f is the identity) opens it "
             "when it ran. "
             + ", ".join(f"`{PLOTS[role]}` ({flags[role]})"
                         for role in dict.fromkeys(c["role"] for c in curves))
             + " plots quality against ÷ target and τ.", "",
             "| draft | setting | f | ε: ÷ target / τ / " + " / ".join(m for m, _ in metrics)
             + " |", "|---|---|---|---|"]
    for curve in curves:
        cells = [f"{e['epsilon']:g}: {_figure(e['speedup_vs_target'], '.2f', '×')} / "
                 f"{_figure(e['block_efficiency'], '.2f')} / "
                 + " / ".join(_figure(get(e), ".3f") for _, get in metrics)
                 for e in curve["points"]]
        lines.append(f"| {curve['role']} | {curve['setting']} | {curve['lenience']} | "
                     + "; ".join(cells) + " |")
    return lines


def write_plots(report: dict[str, Any], folder) -> list[str]:
    """quality_speed.png (and _compare.png) when the report has lenience curves for that draft;
    a plot of an earlier run into the same folder that this report has no curves for is removed,
    so no figure outlives its eval.json."""
    from distillspec.tools.plots import plot_quality_speed

    curves = lenience_curves(report)
    target = next((e for e in report["setups"] if e["kind"] == "target"), None)
    written = []
    for role, name in PLOTS.items():
        mine = [curve for curve in curves if curve["role"] == role]
        if mine:
            title = f"{report.get(role if role == 'draft' else 'compare_draft') or role} draft"
            plot_quality_speed(mine, target, quality_metrics(report), title, folder(name))
            written.append(name)
        elif folder(name).exists():
            folder(name).unlink()
    return written


def write_reports(report: dict[str, Any], run_folder) -> None:
    samples = report.pop("_samples")
    atomic_write_json(run_folder.child("eval.json"), report)
    atomic_write_text(run_folder.child("samples.jsonl"),
                      "".join(json.dumps(line) + "\n" for line in samples))
    atomic_write_text(run_folder.child("eval.md"), markdown_report(report))
    write_plots(report, run_folder.child)


# -- entry point ---------------------------------------------------------------------------------


def resolve_draft(config: EvalConfig) -> str | None:
    """The draft spec the setups need (None when none does); ``auto``: the demo's draft."""
    if not any(setup.uses_draft for setup in config.parsed_setups()):
        return None
    if config.draft != "auto":
        return config.draft
    from distillspec.models.registry import distilled_draft_for

    found = distilled_draft_for(config.target)
    if found is None:
        raise ValueError(
            f"--draft auto: no draft was distilled for {config.target} (`distillspec demo` "
            "records one). Give --draft SPEC (e.g. a distilled folder, or target-layers:4 for "
            "an undistilled one), or measure the target alone with --setups target."
        )
    return str(found)


def build_items(config: EvalConfig, tokenizer, context: int | None,
                problems: list[CodeProblem] | None) -> list[Item]:
    """The eval's prompts as token ids (code: the raw problem prompt; text: ``load_examples``)."""
    if problems is not None:
        items = [Item(p.task_id, list(tokenizer(p.prompt)["input_ids"]), p) for p in problems]
    else:
        from distillspec.training.datasets import load_examples

        examples = load_examples(config.data_spec, tokenizer,
                                 max_prompt_tokens=config.max_prompt_tokens)
        items = [Item(e.source, e.prompt_ids) for e in examples]
    if config.num_prompts:
        items = items[:config.num_prompts]
    for item in items:
        if context is not None and len(item.prompt_ids) + config.new_tokens > context:
            raise ValueError(
                f"{item.key}: its prompt ({len(item.prompt_ids)} tokens) + max_new_tokens "
                f"({config.new_tokens}) exceeds the target's context ({context} positions). "
                "Lower --max-new-tokens (or --max-prompt-tokens for text)."
            )
    return items


def eval_main(config: EvalConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Validate every input, load, claim the output folder, run every setup, write reports."""
    from distillspec.models.loading import build_draft, check_model_spec, load_model, load_pair
    from distillspec.models.quantize import quantize_draft
    from distillspec.models.recommended import resolved_quantization

    progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    apply_threads(config.runtime)
    check_model_spec(config.target, config.runtime.allow_download)
    if config.compare_draft:
        check_model_spec(config.compare_draft, config.runtime.allow_download)
    problems = load_problems(config.data_spec) if config.task == "code" else None
    draft_spec = resolve_draft(config)
    sandbox = None
    if problems is not None:
        sandbox = check_sandbox(config.sandbox_limits())
        progress(f"eval: sandbox: {sandbox}")
    options = load_options(config.runtime)
    if draft_spec is None:
        refuse_draft_quantize(config.runtime, "eval without a draft setup")
        target, tokenizer = load_model(config.target, **options)
        draft = None
    else:
        target, draft, tokenizer = load_pair(config.target, draft_spec,
                                             **pair_options(config.runtime))
    compare = None
    if config.compare_draft:
        compare = build_draft(config.compare_draft, target, tokenizer,
                              trust_remote_code=config.runtime.trust_remote_code,
                              allow_download=config.runtime.allow_download)
        compare = quantize_draft(compare, resolved_quantization(
            draft_weights_option(config.runtime), config.compare_draft, config.target, target))
    context = getattr(target.config, "max_position_embeddings", None)
    items = build_items(config, tokenizer, context, problems)
    run_folder = claim(config.out, "eval")
    run_folder.track(*REPORTS)
    report = run_eval(config, target, draft, tokenizer, items, progress, sandbox, compare)
    report["draft"] = draft_spec  # what auto resolved to
    report["compare_draft"] = config.compare_draft or None
    write_reports(report, run_folder)
    print(markdown_report(report))
    progress(f"eval: wrote {run_folder.path}/eval.json, eval.md, samples.jsonl")
    return report

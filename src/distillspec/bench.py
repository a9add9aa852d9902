"""``distillspec bench``: our speculative decoding against the anchors, side by side in one run.

For a target/draft pair and a prompt set, at each temperature and batch size, every method runs
once as warm-up and then ``repeats`` times over the same prompts; tokens/s is new tokens / wall
time of one repeat, and we report the median repeat:

* ``hf_plain``     target alone through ``transformers`` ``generate``
* ``ours_plain``   target alone through our loop (same cache and sampling code as our SD)
* ``hf_assisted``  ``transformers`` assisted generation with the same draft, fixed gamma
                   (``num_assistant_tokens_schedule="constant"``, confidence threshold 0).
                   It is batch-1 only: at batch > 1 it is reported as unsupported and our SD
                   is compared with ``hf_plain`` at that batch size instead.
* ``ours_sd``      our speculative decoding at each gamma

Also: alpha, tau and acceptance from our SD; the measured cost ratio c = draft step time /
target step time; Leviathan's predicted speed-up from (alpha, gamma, c) and measured/predicted;
the recommended gamma. Output: JSON, a Markdown table and PNG plots.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillspec.config import BenchConfig, to_dict
from distillspec.engine import autoregressive_generate, speculative_generate, synchronize
from distillspec.metrics import combined_counts, predicted_speedup
from distillspec.policies import left_pad


@dataclass
class Prompt:
    """One prompt as token ids, with an id for answer files."""

    prompt_id: str
    input_ids: list[int]


def _batches(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


def timed_repeats(run_once: Callable[[], Any], repeats: int, device) -> tuple[list[float], Any]:
    """Warm up once, then time ``repeats`` runs; returns the wall times and the last result."""
    run_once()
    walls, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = run_once()
        synchronize(device)
        walls.append(time.perf_counter() - start)
    return walls, result


class Runner:
    """The four methods over one prompt set at one temperature and batch size."""

    def __init__(
        self,
        target,
        draft,
        prompts: list[Prompt],
        *,
        batch_size: int,
        temperature: float,
        max_new_tokens: int,
        eos: list[int] | None,
        pad_id: int,
        seed: int,
    ):
        self.target, self.draft = target, draft
        self.batches = _batches(prompts, batch_size)
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.eos, self.pad_id, self.seed = eos, pad_id, seed
        self.device = target.device
        self.encoded = [
            left_pad([p.input_ids for p in batch], pad_id, self.device) for batch in self.batches
        ]

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def _sampling(self) -> dict:
        return dict(
            temperature=self.temperature, max_new_tokens=self.max_new_tokens, eos_token_id=self.eos
        )

    def ours_plain(self) -> list:
        generator = self._generator()
        return [
            autoregressive_generate(self.target, ids, mask, generator=generator, **self._sampling())
            for ids, mask in self.encoded
        ]

    def ours_sd(self, gamma: int) -> list:
        generator = self._generator()
        return [
            speculative_generate(
                self.target,
                self.draft,
                ids,
                mask,
                gamma=gamma,
                generator=generator,
                **self._sampling(),
            )
            for ids, mask in self.encoded
        ]

    def _hf_kwargs(self) -> dict:
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos or None,
        )
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def hf_plain(self) -> list[list[list[int]]]:
        torch.manual_seed(self.seed)
        return [
            self._new_tokens(
                self.target.generate(input_ids=ids, attention_mask=mask, **self._hf_kwargs()), ids
            )
            for ids, mask in self.encoded
        ]

    def hf_assisted(self, gamma: int) -> list[list[list[int]]]:
        config = self.draft.generation_config
        config.num_assistant_tokens = gamma
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        torch.manual_seed(self.seed)
        return [
            self._new_tokens(
                self.target.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    assistant_model=self.draft,
                    **self._hf_kwargs(),
                ),
                ids,
            )
            for ids, mask in self.encoded
        ]

    def _new_tokens(self, output: torch.Tensor, input_ids: torch.Tensor) -> list[list[int]]:
        rows = []
        for row in output[:, input_ids.shape[1] :].tolist():
            if self.eos:  # generate pads finished rows; cut after the first EOS
                for index, token in enumerate(row):
                    if token in self.eos:
                        row = row[: index + 1]
                        break
            rows.append(row)
        return rows


def _count_tokens(result) -> int:
    if result and hasattr(result[0], "sequences"):
        return sum(len(s) for r in result for s in r.sequences)
    return sum(len(s) for batch in result for s in batch)


def _throughput(walls: list[float], tokens: int) -> dict[str, float]:
    median = statistics.median(walls)
    return {
        "tokens_per_s": tokens / median,
        "median_wall_s": median,
        "new_tokens": tokens,
        "repeats_wall_s": walls,
    }


def _sd_metrics(results: list, plain_results: list) -> dict[str, float]:
    """alpha, tau, acceptance and the draft/target step cost ratio c from our runs."""
    total = combined_counts(results)
    draft_time = sum(r.metrics.draft_time_s for r in results)
    draft_passes = sum(r.metrics.draft_forward_passes for r in results)
    plain_time = sum(r.metrics.wall_time_s for r in plain_results)
    plain_passes = sum(r.metrics.target_forward_passes for r in plain_results)
    return {
        "acceptance_rate": total.acceptance_rate or 0.0,
        "analytic_alpha": total.analytic_alpha or 0.0,
        "block_efficiency": total.block_efficiency or 0.0,
        "cost_ratio_c": (draft_time / max(draft_passes, 1)) / (plain_time / max(plain_passes, 1)),
        "accepted_length_histogram": total.accepted_length_histogram,
    }


def bench_setting(runner: Runner, gammas: list[int], repeats: int) -> dict[str, Any]:
    """All methods at one (temperature, batch size)."""
    device = runner.device
    batch_size = max(len(b) for b in runner.batches)
    walls, plain = timed_repeats(runner.ours_plain, repeats, device)
    ours_plain = _throughput(walls, _count_tokens(plain))
    walls, hf = timed_repeats(runner.hf_plain, repeats, device)
    hf_plain = _throughput(walls, _count_tokens(hf))
    rows = []
    for gamma in gammas:
        walls, sd = timed_repeats(lambda g=gamma: runner.ours_sd(g), repeats, device)
        row = {
            "gamma": gamma,
            "ours_sd": _throughput(walls, _count_tokens(sd)),
            **_sd_metrics(sd, plain),
        }
        row["speedup_vs_ours_plain"] = row["ours_sd"]["tokens_per_s"] / ours_plain["tokens_per_s"]
        row["speedup_vs_hf_plain"] = row["ours_sd"]["tokens_per_s"] / hf_plain["tokens_per_s"]
        row["predicted_speedup"] = predicted_speedup(
            row["analytic_alpha"], gamma, row["cost_ratio_c"]
        )
        row["measured_over_predicted"] = row["speedup_vs_ours_plain"] / row["predicted_speedup"]
        if batch_size == 1:
            walls, assisted = timed_repeats(lambda g=gamma: runner.hf_assisted(g), repeats, device)
            row["hf_assisted"] = _throughput(walls, _count_tokens(assisted))
            row["ours_over_hf_assisted"] = (
                row["ours_sd"]["tokens_per_s"] / row["hf_assisted"]["tokens_per_s"]
            )
        else:
            row["hf_assisted"] = None
            row["hf_assisted_note"] = (
                "transformers assisted generation supports batch size 1 only; compare ours_sd "
                "with hf_plain at this batch size"
            )
        rows.append(row)
    best = max(rows, key=lambda r: r["ours_sd"]["tokens_per_s"])
    return {
        "batch_size": batch_size,
        "temperature": runner.temperature,
        "ours_plain": ours_plain,
        "hf_plain": hf_plain,
        "by_gamma": rows,
        "recommended_gamma": best["gamma"],
    }


def run_bench(
    config: BenchConfig,
    target,
    draft,
    tokenizer,
    prompts: list[Prompt],
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    from distillspec.loading import eos_token_ids, pad_token_id

    eos = eos_token_ids(target, tokenizer) if config.stop_at_eos else None
    settings = []
    for temperature in config.temperature_list():
        for batch_size in config.batch_size_list():
            progress(f"bench: temperature {temperature:g}, batch {batch_size} ...")
            runner = Runner(
                target,
                draft,
                prompts,
                batch_size=batch_size,
                temperature=temperature,
                max_new_tokens=config.max_new_tokens,
                eos=eos,
                pad_id=pad_token_id(tokenizer),
                seed=config.seed,
            )
            settings.append(bench_setting(runner, config.gamma_list(), config.repeats))
    return {
        "config": to_dict(config),
        "device": str(target.device),
        "dtype": str(target.dtype),
        "num_prompts": len(prompts),
        "settings": settings,
    }


# -- reports -------------------------------------------------------------------------------------


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| T | batch | gamma | ours SD tok/s | ours plain | HF plain | HF assisted | SD ÷ plain "
        "| SD ÷ HF assisted | alpha | tau | c | predicted | measured ÷ predicted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in report["settings"]:
        for row in setting["by_gamma"]:
            assisted = row["hf_assisted"]
            star = " ★" if row["gamma"] == setting["recommended_gamma"] else ""
            assisted_tps = f"{assisted['tokens_per_s']:.1f}" if assisted else "batch-1 only"
            versus = f"{row['ours_over_hf_assisted']:.2f}×" if assisted else "–"
            lines.append(
                f"| {setting['temperature']:g} | {setting['batch_size']} | {row['gamma']}{star} "
                f"| {row['ours_sd']['tokens_per_s']:.1f} "
                f"| {setting['ours_plain']['tokens_per_s']:.1f} "
                f"| {setting['hf_plain']['tokens_per_s']:.1f} "
                f"| {assisted_tps} | {row['speedup_vs_ours_plain']:.2f}× | {versus} "
                f"| {row['analytic_alpha']:.3f} | {row['block_efficiency']:.2f} "
                f"| {row['cost_ratio_c']:.2f} | {row['predicted_speedup']:.2f}× "
                f"| {row['measured_over_predicted']:.2f} |"
            )
    lines.append("")
    lines.append(
        "★ = recommended gamma (highest measured tokens/s) for that temperature and batch."
    )
    return "\n".join(lines) + "\n"


def write_reports(report: dict[str, Any], out_dir: Path) -> list[Path]:
    from distillspec.plots import plot_bench

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "bench.json", out_dir / "bench.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown_table(report))
    paths += plot_bench(report, out_dir)
    return paths


# -- Spec-Bench question / answer files ------------------------------------------------------------


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """Spec-Bench ``question.jsonl``: ``{"question_id", "category", "turns": [str, ...]}``."""
    from distillspec.data import read_jsonl

    questions = []
    for line_number, record in read_jsonl(path):
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(
                f'{path}:{line_number}: a Spec-Bench question needs "turns": a non-empty list '
                "of strings."
            )
        questions.append(
            {
                "question_id": record.get("question_id", line_number),
                "category": record.get("category", ""),
                "turns": turns,
            }
        )
    return questions


def _render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The conversation so far with the chat template, or plain turns when there is none."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def answer_questions(
    questions,
    target,
    draft,
    tokenizer,
    *,
    gamma: int,
    max_new_tokens: int,
    temperature: float,
    model_id: str,
    seed: int,
) -> list[dict[str, Any]]:
    """Answer every turn with our SD (batch 1, chat template, history kept across turns) and
    record Spec-Bench's per-turn ``wall_time``, ``new_tokens`` and ``accept_lengths``."""
    from distillspec.loading import eos_token_ids

    eos = eos_token_ids(target, tokenizer)
    generator = torch.Generator(device=target.device).manual_seed(seed)
    answers = []
    for question in questions:
        messages, turns, wall, new_tokens, accept_lengths = [], [], [], [], []
        for turn in question["turns"]:
            messages.append({"role": "user", "content": turn})
            text = _render(tokenizer, messages)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            result = speculative_generate(
                target,
                draft,
                ids.to(target.device),
                gamma=gamma,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                eos_token_id=eos,
                generator=generator,
            )
            reply = tokenizer.decode(result.sequences[0], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})
            turns.append(reply)
            wall.append(result.metrics.wall_time_s)
            new_tokens.append(len(result.sequences[0]))
            # Spec-Bench's accept length counts the tokens each target call produced.
            accept_lengths.append([n + 1 for n in result.metrics.rows[0].accepted_lengths])
        answers.append(
            {
                "question_id": question["question_id"],
                "category": question["category"],
                "model_id": model_id,
                "tstamp": time.time(),
                "choices": [
                    {
                        "index": 0,
                        "turns": turns,
                        "wall_time": wall,
                        "new_tokens": new_tokens,
                        "accept_lengths": accept_lengths,
                    }
                ],
            }
        )
    return answers


# -- entry point ---------------------------------------------------------------------------------


def load_prompts_for_bench(config: BenchConfig, tokenizer) -> list[Prompt]:
    from distillspec.datasets import load_examples

    examples = load_examples(config.prompts, tokenizer, max_prompt_tokens=config.max_prompt_tokens)
    return [Prompt(e.source, e.prompt_ids) for e in examples[: config.num_prompts]]


def bench_main(config: BenchConfig) -> dict[str, Any]:
    """Load the pair, run every setting, write JSON/Markdown/PNG (and Spec-Bench answers)."""
    from distillspec.loading import load_pair

    target, draft, tokenizer = load_pair(
        config.target, config.draft, device=config.device, dtype=config.dtype
    )
    out_dir = Path(config.out)
    report = run_bench(config, target, draft, tokenizer, load_prompts_for_bench(config, tokenizer))
    if config.question_file:
        best = report["settings"][0]["recommended_gamma"]
        answers = answer_questions(
            read_questions(config.question_file),
            target,
            draft,
            tokenizer,
            gamma=best,
            max_new_tokens=config.max_new_tokens,
            temperature=0.0,
            model_id=f"distillspec-sd-gamma{best}",
            seed=config.seed,
        )
        answer_path = Path(config.answer_file or out_dir / "answers.jsonl")
        answer_path.parent.mkdir(parents=True, exist_ok=True)
        answer_path.write_text("".join(json.dumps(a) + "\n" for a in answers))
        report["answer_file"] = str(answer_path)
    write_reports(report, out_dir)
    return report

"""The demo's training data: the target's answers to its own prompts and to written requests.

The target writes ``--prompt-pool`` user prompts (Magpie) and answers them greedily, answers
``--extra-prompts`` (``builtin:chat-pool``) greedily too and, with ``--answer-samples N``, adds N
answers sampled at T = 1 to every prompt of both. Each part is generated once, in batches, and
cached under ``cache_dir()/demo-data`` by what determines it (target, dtype, seed, lengths, the
prompts' content); the joined files are cached beside the parts (``DemoData``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distillspec.common.io import atomic_write_json, atomic_writer, read_jsonl
from distillspec.models.loading import eos_token_ids, resolve_model_path
from distillspec.models.pruned_head import frequent_tokens
from distillspec.models.registry import cache_dir
from distillspec.tools.configs import DemoConfig
from distillspec.training.builtin_data import builtin_dataset_items
from distillspec.training.datagen import datagen, self_prompts, write_prompt_pool
from distillspec.training.datasets import load_examples

SAMPLE_TEMPERATURE = 1.0  # of --answer-samples: the temperature chat users sample at


def say(message: str) -> None:
    """A line of the demo's progress on stderr."""
    print(f"demo: {message}", file=sys.stderr, flush=True)


@dataclass
class DemoData:
    """The demo's training data, cached by what determines it (target, dtype, sizes, seed)."""

    prompts: Path  # JSONL prompts (the Magpie pool, or --distill.data)
    answers: Path  # the target's answers (datagen format: the fixed policy's data)
    seconds: float  # spent generating now (0 when cached)
    generation_minutes: float | None = None  # what generating it took, now or when cached


def demo_data(config: DemoConfig, target, tokenizer) -> DemoData:
    """The pool's prompts and greedy answers, with ``--extra-prompts`` and their greedy answers
    appended, then ``--answer-samples`` sampled answers to all of them (each part generated once
    and cached on its own; the joined files cached beside them)."""
    greedy = _greedy_data(config, target, tokenizer)
    if not config.answer_samples:
        return greedy
    parts = [greedy]
    for index in range(config.answer_samples):
        # Keyed by the greedy file (which is keyed by the prompts): new prompts, new samples.
        key = _data_key(config, target, f"{greedy.answers}|T{SAMPLE_TEMPERATURE}|{index}")
        folder = cache_dir() / "demo-data" / _digest(key)
        parts.append(_answered(config, target, tokenizer, folder, str(greedy.prompts),
                               temperature=SAMPLE_TEMPERATURE, seed=config.distill.seed + 1 + index))
    data = _joined([part.answers for part in parts], greedy.prompts, parts)
    say(f"training data: {data.answers} (greedy answers and {config.answer_samples} "
         f"sample(s) at T={SAMPLE_TEMPERATURE} per prompt)")
    return data


def _greedy_data(config: DemoConfig, target, tokenizer) -> DemoData:
    """The pool's prompts and answers, with ``--extra-prompts`` and their answers appended."""
    pool = _pool_data(config, target, tokenizer)
    if config.extra_prompts == "none":
        return pool
    recipe = config.distill
    # Keyed by the prompts themselves too: an edited prompt file is answered again.
    extra_records = _prompt_records(config.extra_prompts)
    content = _digest(json.dumps(extra_records, sort_keys=True))
    key = _data_key(config, target, f"{config.extra_prompts}|{content}")
    folder = cache_dir() / "demo-data" / _digest(key)
    extra = _answered(config, target, tokenizer, folder, config.extra_prompts)
    folder = cache_dir() / "demo-data" / _digest(f"{pool.answers}|{extra.answers}")
    prompts = folder / "prompts.jsonl"
    if not prompts.is_file():
        with atomic_writer(prompts) as handle:
            for record in _prompt_records(pool.prompts) + extra_records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    data = _joined([pool.answers, extra.answers], prompts, [pool, extra])
    say(f"training data: {data.answers} ({recipe.target}'s answers to its own pool and to "
         f"{config.extra_prompts})")
    return data


def _joined(answer_files: list[Path], prompts: Path, parts: list[DemoData]) -> DemoData:
    """The answer files concatenated once into a folder named by their paths (which name their
    content); generation time summed over the parts."""
    folder = cache_dir() / "demo-data" / _digest("|".join(map(str, answer_files)))
    answers = folder / "answers.jsonl"
    if not answers.is_file():
        with atomic_writer(answers) as handle:
            for part in answer_files:
                handle.write(part.read_text(encoding="utf-8"))
    made = [part.generation_minutes for part in parts if part.generation_minutes is not None]
    return DemoData(prompts, answers, sum(part.seconds for part in parts),
                    sum(made) if made else None)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _data_key(config: DemoConfig, target, source: str) -> str:
    recipe = config.distill
    return "|".join(map(str, (resolve_model_path(recipe.target), target.dtype, source, recipe.seed,
                              recipe.max_new_tokens, recipe.max_prompt_tokens)))


def _prompt_records(spec) -> list:
    """The JSONL records of a prompt file, or of a built-in prompt set (``builtin:NAME[:part]``)."""
    if str(spec).startswith("builtin:"):
        return [item.record for item in builtin_dataset_items(str(spec))]
    return [record for _, record in read_jsonl(spec)]


def _pool_data(config: DemoConfig, target, tokenizer) -> DemoData:
    """The Magpie pool (``--prompt-pool`` prompts the target writes) or ``--distill.data``'s
    prompts, answered greedily by the target; cached."""
    recipe = config.distill
    source = f"pool{config.prompt_pool}" if config.prompt_pool else recipe.data
    folder = cache_dir() / "demo-data" / _digest(_data_key(config, target, source))
    prompts = folder / "prompts.jsonl" if config.prompt_pool else Path(recipe.data)
    if config.prompt_pool and not prompts.is_file() and not (folder / "answers.jsonl").is_file():
        say(f"training data: the target writes {config.prompt_pool} prompts (once, cached) ...")
        from tqdm.auto import tqdm

        eos = eos_token_ids(target, tokenizer)
        with tqdm(total=config.prompt_pool, unit="prompt", desc="self-prompts") as bar:
            pool = self_prompts(target, tokenizer, config.prompt_pool, seed=recipe.seed,
                                eos_token_id=eos, batch_size=128, progress=bar.update)
        write_prompt_pool(pool, prompts)
    return _answered(config, target, tokenizer, folder, str(prompts), source, prompts)


def _answered(config: DemoConfig, target, tokenizer, folder: Path, spec: str,
              source: str | None = None, prompts: Path | None = None, *,
              temperature: float = 0.0, seed: int = 0) -> DemoData:
    """The target's answers to ``spec``'s prompts (``source`` names them), greedy or sampled at
    ``temperature`` with ``seed``, cached in ``folder``."""
    recipe = config.distill
    source = source or spec
    answers, info = folder / "answers.jsonl", folder / "info.json"
    prompts = prompts if prompts is not None else Path(spec)
    if answers.is_file():
        made = json.loads(info.read_text()).get("generation_minutes") if info.is_file() else None
        note = f", generated in {made:.1f} min" if made is not None else ""
        say(f"training data: {answers} (cached{note})")
        return DemoData(prompts, answers, 0.0, made)
    start = time.perf_counter()
    examples = load_examples(spec, tokenizer, max_prompt_tokens=recipe.max_prompt_tokens)
    how = f"samples at T={temperature}" if temperature else "greedily"
    say(f"training data: the target answers {len(examples)} prompts of {source} {how} "
         "(once, cached) ...")
    from tqdm.auto import tqdm

    generator = (torch.Generator(device=target.device).manual_seed(seed) if temperature
                 else None)
    with tqdm(total=len(examples), unit="prompt",
              desc="sampled answers" if temperature else "greedy answers") as bar:
        datagen(target, tokenizer, examples, answers, temperature=temperature,
                max_new_tokens=recipe.max_new_tokens, batch_size=128,
                eos_token_id=eos_token_ids(target, tokenizer), generator=generator,
                progress=bar.update)
    seconds = time.perf_counter() - start
    atomic_write_json(info, {"generation_minutes": seconds / 60, "examples": len(examples),
                             "source": source, "target": recipe.target,
                             "temperature": temperature})
    return DemoData(prompts, answers, seconds, seconds / 60)


def answer_vocabulary(data: DemoData, keep: int, eos: list[int], vocab_size: int) -> torch.Tensor:
    """The ids the trainer will keep for a :vocab=K draft (same rule, same data)."""
    completions = [record["completion_ids"] for _, record in read_jsonl(data.answers)]
    return frequent_tokens(completions, keep, vocab_size, always=eos)

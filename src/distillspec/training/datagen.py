"""Generating training data with a model: completions for prompts, cached as JSONL.

``generate_completions`` samples (or greedily decodes) new tokens for token-id prompts through
the engine; ``datagen`` runs it over a prompt set and writes one JSON line per prompt, atomically.
Training on such a file with the ``fixed`` policy is the cached form of the teacher policy.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from distillspec.common.io import atomic_writer, read_jsonl
from distillspec.decoding.generate import generate_ids
from distillspec.training.datasets import PromptExample

DATAGEN_KEYS = ("prompt", "completion", "prompt_ids", "completion_ids")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, then every module's own previous ``training`` flag back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def generate_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None,
    generator: torch.Generator | None,
    pad_id: int = 0,
) -> list[list[int]]:
    """New tokens per prompt (EOS included when hit), decoded by the engine in eval mode.

    ``generator`` must live on the model's device.
    """
    with eval_mode(model):
        return generate_ids(
            model,
            [list(p) for p in prompts],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=eos_token_id,
            generator=generator,
            pad_id=pad_id,
        )


def datagen(
    target: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[PromptExample],
    out_path: str | Path,
    *,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    eos_token_id: int | Iterable[int] | None,
    generator: torch.Generator | None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Sample a completion from the target for every example and write them as JSONL.

    Each line is ``{"prompt", "completion", "prompt_ids", "completion_ids"}`` (texts decoded with
    special tokens kept, for reading; the ids are what ``load_examples`` uses). The file appears
    atomically. Load it with ``max_completion_tokens >= max_new_tokens`` or completions are
    truncated. ``progress(n)`` is called after each batch. Returns the number of lines written.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not examples:
        raise ValueError("datagen got no examples; nothing to generate.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with atomic_writer(out_path) as handle:
        for start in range(0, len(examples), batch_size):
            prompts = [e.prompt_ids for e in examples[start : start + batch_size]]
            completions = generate_completions(
                target,
                prompts,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                generator=generator,
                pad_id=pad_id,
            )
            for prompt, completion in zip(prompts, completions):
                record = {
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "completion": tokenizer.decode(completion, skip_special_tokens=False),
                    "prompt_ids": list(prompt),
                    "completion_ids": list(completion),
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            if progress is not None:
                progress(len(prompts))
    return len(examples)


def is_datagen_file(path: Path) -> bool:
    """True when ``path``'s first line has the keys ``datagen`` writes (safe to replace)."""
    try:
        with path.open(encoding="utf-8") as handle:
            first = json.loads(handle.readline() or "{}")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and set(DATAGEN_KEYS) <= set(first)


def teacher_cache(
    target: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[PromptExample],
    path: Path,
    *,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None,
    generator: torch.Generator | None,
    batch_size: int = 16,
) -> dict[str, list[int]]:
    """The target's completion of every example (source -> ids), generated once into ``path``.

    An existing file is reused when it holds exactly these prompts (a resumed run); otherwise
    it is regenerated. Batched through the engine, which is much faster than per-step sampling.
    """
    expected = {e.source: list(e.prompt_ids) for e in examples}
    if path.is_file():
        cached = {}
        for _, record in read_jsonl(path):
            cached[record.get("source")] = (record.get("prompt_ids"), record.get("completion_ids"))
        if set(cached) == set(expected) and all(cached[s][0] == p for s, p in expected.items()):
            return {source: ids for source, (_, ids) in cached.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with atomic_writer(path) as handle:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            completions = generate_completions(
                target, [e.prompt_ids for e in chunk], temperature=temperature,
                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                generator=generator, pad_id=pad_id,
            )
            for example, completion in zip(chunk, completions):
                record = {"source": example.source, "prompt_ids": list(example.prompt_ids),
                          "completion_ids": completion}
                handle.write(json.dumps(record) + "\n")
    return teacher_cache(target, tokenizer, examples, path, temperature=temperature,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         generator=generator, batch_size=batch_size)

"""Generating training data with a model: completions for prompts, cached as JSONL.

``generate_completions`` samples (or greedily decodes) new tokens for token-id prompts through
the engine; ``datagen`` runs it over a prompt set and writes one JSON line per prompt, atomically.
Training on such a file with the ``fixed`` policy is the cached form of the teacher policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from distillspec.common.io import atomic_writer, read_jsonl
from distillspec.decoding.generate import generate_ids, generate_many
from distillspec.decoding.params import SamplingConfig
from distillspec.training.config import OPENER_CHOICES
from distillspec.training.datasets import PromptExample
from distillspec.training.shards import ONE_RANK, Ranks, Shards, mine, remove

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
    """New tokens per prompt (EOS included when hit), decoded by the engine in eval mode as one
    batch (``datagen`` uses continuous batching instead).

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
    truncated. ``progress(1)`` is called as each prompt finishes. Returns the lines written.
    """
    _check_job(batch_size, examples)
    done = _generate_all(target, [e.prompt_ids for e in examples], temperature=temperature,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         seed=_base_seed(generator), batch_size=batch_size, progress=progress)
    with atomic_writer(out_path) as handle:
        handle.write(_lines(tokenizer, examples, done))
    return len(examples)


def datagen_sharded(
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
    job: str,
    shard_prompts: int,
    ranks: Ranks = ONE_RANK,
    replace: bool = False,
) -> int:
    """``datagen`` in shards of ``shard_prompts`` prompts dealt over the ranks (under torchrun
    or ``accelerate launch`` every rank calls it with the same arguments), resumable per shard.

    Prompt i samples with seed base + i (base drawn from ``generator``, seeded alike on every
    rank) and each shard is decoded on its own, so the file is the same, line for line, on any
    number of ranks. Shards go to ``OUT.parts/`` (see ``shards``) until the main rank merges
    them into ``out_path`` atomically and removes them; rerunning a killed job redoes only the
    unfinished shards (``replace``: discard another job's shards there instead of refusing).
    ``job`` names what else the answers depend on (the target's spec). A progress bar counts
    the main rank's prompts. Returns the lines written.
    """
    from tqdm.auto import tqdm

    _check_job(batch_size, examples)
    out_path = Path(out_path)
    seed = _base_seed(generator)
    shards = Shards(parts_folder(out_path), len(examples), shard_prompts, "jsonl")
    digest = hashlib.sha256(json.dumps([
        job, str(target.dtype), target.device.type, temperature, max_new_tokens, eos_token_id
        if eos_token_id is None or isinstance(eos_token_id, int) else sorted(eos_token_id),
        batch_size, seed, [list(e.prompt_ids) for e in examples]]).encode()).hexdigest()
    todo, finished = mine(shards, digest, ranks, replace=replace)
    if finished and ranks.is_main_process:
        print(f"datagen: {finished} of {shards.count} shards were finished by an earlier run "
              f"(kept in {shards.folder}); generating the rest.", file=sys.stderr)
    total = sum(shards.bounds(i)[1] - shards.bounds(i)[0] for i in todo)
    with tqdm(total=total, unit="prompt", dynamic_ncols=True, disable=not ranks.is_main_process,
              desc="datagen" if ranks.num_processes == 1 else
              f"datagen, rank 0 of {ranks.num_processes}") as bar:
        for index in todo:
            start, stop = shards.bounds(index)
            chunk = examples[start:stop]
            done = _generate_all(target, [e.prompt_ids for e in chunk], temperature=temperature,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                 seed=seed + start, batch_size=batch_size, progress=bar.update)
            shards.write(index, _lines(tokenizer, chunk, done).encode("utf-8"))
    ranks.wait_for_everyone()
    if ranks.is_main_process:
        with atomic_writer(out_path, "wb") as handle:
            for path in shards.paths():
                handle.write(path.read_bytes())
        remove(shards)
    ranks.wait_for_everyone()
    return len(examples)


def parts_folder(out_path: Path) -> Path:
    """Where ``datagen_sharded`` keeps the shards of ``out_path`` until they are merged."""
    return out_path.with_name(out_path.name + ".parts")


def _check_job(batch_size: int, examples: Sequence[PromptExample]) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not examples:
        raise ValueError("datagen got no examples; nothing to generate.")


def _lines(tokenizer: Any, examples: Sequence[PromptExample], done: list[list[int]]) -> str:
    """The JSONL lines of ``datagen``: texts for reading, the ids for training."""
    lines = []
    for example, completion in zip(examples, done):
        record = {
            "prompt": tokenizer.decode(example.prompt_ids, skip_special_tokens=False),
            "completion": tokenizer.decode(completion, skip_special_tokens=False),
            "prompt_ids": list(example.prompt_ids),
            "completion_ids": list(completion),
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def _base_seed(generator: torch.Generator | None) -> int:
    """The seed prompt 0 samples with (prompt i: this + i), drawn from ``generator``."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31, (1,), generator=generator, device=device))


def _generate_all(model, prompts, *, temperature, max_new_tokens, eos_token_id, seed,
                  batch_size, progress=None) -> list[list[int]]:
    """Every prompt's completion through continuous batching (eval mode; prompt i samples with
    seed ``seed + i``)."""

    def finished(index: int, tokens: list[int]) -> None:
        if progress is not None:
            progress(1)

    with eval_mode(model):
        done = generate_many(model, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                             sampling=SamplingConfig(temperature=temperature),
                             eos_token_id=eos_token_id, batch_size=batch_size, seed=seed,
                             on_done=finished)
    return [done[i] for i in range(len(prompts))]


def is_datagen_file(path: Path) -> bool:
    """True when ``path``'s first line is one datagen writes (completions or a prompt pool)."""
    try:
        with path.open(encoding="utf-8") as handle:
            first = json.loads(handle.readline() or "{}")
    except (OSError, ValueError):
        return False
    if not isinstance(first, dict):
        return False
    pool_line = list(first) == ["messages"] and len(first["messages"]) == 1
    return set(DATAGEN_KEYS) <= set(first) or pool_line


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
    batch_size: int = 128,
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
    from tqdm.auto import tqdm

    with tqdm(total=len(examples), unit="prompt", desc="teacher completions",
              dynamic_ncols=True) as bar:
        done = _generate_all(target, [e.prompt_ids for e in examples], temperature=temperature,
                             max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                             seed=_base_seed(generator), batch_size=batch_size,
                             progress=bar.update)
    with atomic_writer(path) as handle:
        for example, completion in zip(examples, done):
            record = {"source": example.source, "prompt_ids": list(example.prompt_ids),
                      "completion_ids": completion}
            handle.write(json.dumps(record) + "\n")
    return {e.source: completion for e, completion in zip(examples, done)}


def pre_query_template(tokenizer) -> list[int]:
    """The chat template up to where a user's message starts (Magpie's pre-query template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "Self-generated prompts need an instruction-tuned target with a chat template; "
            "this tokenizer has none. Give a prompt file with --data instead."
        )
    marker = "\u2063distillspec-marker\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in text:
        raise ValueError("Cannot find where the user's message starts in this chat template.")
    return list(tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"])


# Generic request types of instruction data (open and closed questions, how-to, brainstorming,
# writing, rewriting, summarising, comparing, planning, coding, arithmetic), as the first words of
# a self-written prompt. Plain Magpie ("") from a small target writes mostly "Can you provide ...".
TASK_OPENERS = (
    "", "Write", "Explain", "How do I", "What is", "Why", "List", "Give me", "Describe",
    "Compare", "Summarise", "Suggest", "What are", "How can I", "Tell me", "Create", "Rewrite",
    "Plan", "Calculate", "I", "Is it", "Help me", "Translate", "Write a Python",
)  # fmt: skip


def prompt_openers(name: str) -> tuple[str, ...]:
    """The openers ``self_prompts`` cycles through: none (plain Magpie) or tasks (TASK_OPENERS)."""
    if name not in OPENER_CHOICES:
        raise ValueError(f"prompt openers must be one of {', '.join(OPENER_CHOICES)}, got {name!r}.")
    return TASK_OPENERS if name == "tasks" else ("",)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def self_prompts(
    target: torch.nn.Module,
    tokenizer: Any,
    count: int,
    *,
    seed: int,
    eos_token_id: Iterable[int],
    batch_size: int = 128,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    openers: Sequence[str] = ("",),
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """``count`` user prompts written by the target itself (Magpie, Xu et al. 2024).

    The target continues its pre-query template at ``temperature``; a sample is kept when it
    ends the user turn (an EOS id) within ``max_new_tokens``, has 3 to 80 words and is not a
    case/space-insensitive duplicate of one already kept. Sample i starts its message with
    ``openers[i % len(openers)]`` (``""``: nothing, plain Magpie; see TASK_OPENERS), so the
    pool is not only the few kinds of request the target writes unprompted. Seeded: the same
    call gives the same prompts. Raises if too few usable prompts come out of 8x as many samples.
    """
    template = pre_query_template(tokenizer)
    # An opener's ids are decoded with the continuation, so the tokenizer places the spaces.
    opener_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] if o else []
                  for o in (list(openers) or [""])]
    stops = set(eos_token_id)
    kept, seen, tried = [], set(), [0]

    def finished(index: int, row: list[int]) -> bool:
        tried[0] += 1
        if row and row[-1] in stops:  # the target finished its message
            written = opener_ids[index % len(opener_ids)] + row[:-1]
            text = tokenizer.decode(written, skip_special_tokens=True).strip()
            key = _normalise(text)
            if 3 <= len(key.split()) <= 80 and key not in seen:
                seen.add(key)
                kept.append(text)
                if progress is not None:
                    progress(1)
        return len(kept) >= count

    def prefixes():
        for index in itertools.count():
            if tried[0] >= 8 * count:
                return
            yield template + opener_ids[index % len(opener_ids)]

    with eval_mode(target):
        generate_many(target, prefixes(), max_new_tokens=max_new_tokens,
                      sampling=SamplingConfig(temperature=temperature), eos_token_id=sorted(stops),
                      batch_size=batch_size, seed=seed, on_done=finished)
    if len(kept) < count:
        raise ValueError(
            f"The target wrote only {len(kept)} usable prompts in {tried[0]} samples; ask for "
            "fewer, or give a prompt file."
        )
    return kept[:count]


def write_prompt_pool(prompts: Sequence[str], path: str | Path) -> None:
    """One ``{"messages": [{"role": "user", ...}]}`` line per prompt, atomically."""
    with atomic_writer(path) as handle:
        for prompt in prompts:
            handle.write(json.dumps({"messages": [{"role": "user", "content": prompt}]},
                                    ensure_ascii=False) + "\n")

"""Training examples for DistillSpec: prompts x (and, when the data has them, completions y).

``load_examples`` reads three kinds of source, each into a list of ``PromptExample``:

* JSONL, one object per line, either ``{"prompt": str, "completion": str (optional)}`` or
  ``{"messages": [{"role": str, "content": str}, ...]}``. When the last message is the
  assistant's it is the completion and the earlier ones, rendered with the tokenizer's chat
  template (``add_generation_prompt=True``), are the prompt; otherwise every message is prompt.
  Lines written by ``datagen`` also carry ``prompt_ids``/``completion_ids``, which are
  used as they are (exact token round trip) instead of re-tokenising the text.
* A plain-text corpus: a ``.txt`` file or a directory of ``.txt`` files (see ``load_examples``).
* A built-in dataset, ``builtin:NAME[:heldout|:all]`` (``models.registry``): its text files
  and records are read by the same rules.

Token rules: completions are tokenised without special tokens and truncated from the right;
non-chat prompts get the tokenizer's special tokens (e.g. BOS), chat prompts get exactly what the
chat template renders; prompts are truncated from the left, keeping the special tokens.
Malformed input raises ``ValueError`` naming ``path:line``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillspec.common.io import read_jsonl, read_text_file
from distillspec.models.registry import BUILTIN_PREFIX
from distillspec.training.builtin_data import builtin_dataset_items

TEXT_SUFFIX = ".txt"


@dataclass
class PromptExample:
    """One prompt as token ids, its completion when the data has one, and where it came from."""

    prompt_ids: list[int]
    completion_ids: list[int] | None
    source: str  # "file.jsonl:12" or "corpus.txt:tokens[0:384]"


def load_examples(
    path: str | Path,
    tokenizer: Any,
    *,
    max_prompt_tokens: int = 256,
    max_completion_tokens: int = 128,
) -> list[PromptExample]:
    """Read a JSONL file, a ``.txt`` file, a directory of ``.txt`` files or ``builtin:NAME``.

    Plain text: each file (directories: every ``*.txt`` inside, in name order, not recursive) is
    tokenised as a whole without special tokens and cut into consecutive, non-overlapping windows
    of ``W = (max_prompt_tokens - s) + max_completion_tokens`` tokens, where ``s`` is the number
    of special tokens the tokenizer adds to a prompt (BOS...). The stride is ``W``: window ``k``
    covers tokens ``[k*W, (k+1)*W)``; its first ``max_prompt_tokens - s`` tokens (plus the
    special tokens) are the prompt and the rest the completion. A final window too short to have
    a completion token is dropped; windows never cross files.
    """
    for name, value in (
        ("max_prompt_tokens", max_prompt_tokens),
        ("max_completion_tokens", max_completion_tokens),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    spec = str(path)
    path = Path(path)
    encoder = _Encoder(tokenizer, max_prompt_tokens, max_completion_tokens)
    if spec.startswith(BUILTIN_PREFIX):
        examples = _builtin_examples(spec, encoder)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == TEXT_SUFFIX)
        if not files:
            raise ValueError(
                f"{path} is a directory without {TEXT_SUFFIX} files. Point to a JSONL file, a "
                f"{TEXT_SUFFIX} file or a folder of {TEXT_SUFFIX} files."
            )
        examples = [example for file in files for example in _text_windows(file, encoder)]
    elif path.suffix == TEXT_SUFFIX:
        if not path.is_file():
            raise ValueError(f"Data file {path} does not exist.")
        examples = _text_windows(path, encoder)
    else:
        examples = [
            _jsonl_example(record, f"{path}:{line}", encoder) for line, record in read_jsonl(path)
        ]
    if not examples:
        hint = (
            f" Each text file needs more than {encoder.prompt_room} tokens for one window; lower "
            "max_prompt_tokens or add text."
            if path.is_dir() or path.suffix == TEXT_SUFFIX
            else ""
        )
        raise ValueError(f"{path} contains no examples.{hint}")
    return examples


def split_examples(
    examples: Sequence[PromptExample], held_out: float | int, seed: int
) -> tuple[list[PromptExample], list[PromptExample]]:
    """Deterministically shuffle (``random.Random(seed)``) and split into ``(train, held_out)``.

    ``held_out`` is a fraction in (0, 1) of the examples (rounded to the nearest count) or an
    integer count (0 holds nothing out). Both parts keep the shuffled order.
    """
    n = len(examples)
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise ValueError(
            f"held_out must be a fraction in (0, 1) or an integer count, got {held_out!r}."
        )
    if isinstance(held_out, float):
        if not 0.0 < held_out < 1.0:
            raise ValueError(
                f"held_out fraction must be in (0, 1), got {held_out}. Use e.g. 0.1, or an "
                "integer for an exact count."
            )
        count = round(held_out * n)
        if count == 0:
            raise ValueError(
                f"held_out={held_out} of {n} examples rounds to 0 held-out examples. Use a "
                "larger fraction or an integer count."
            )
    else:
        count = held_out
        if count < 0:
            raise ValueError(f"held_out count must be >= 0, got {count}.")
    if count >= n:
        raise ValueError(
            f"held_out={held_out!r} holds out {count} of {n} examples, leaving no training "
            "data. Hold out fewer examples or add data."
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = [examples[i] for i in order[:count]]
    train = [examples[i] for i in order[count:]]
    return train, held


# ---------------------------------------------------------------------------------------------


class _Encoder:
    """Tokenisation with the length limits and the tokenizer's special-token affixes."""

    def __init__(self, tokenizer: Any, max_prompt_tokens: int, max_completion_tokens: int):
        self.tokenizer = tokenizer
        self.max_prompt = max_prompt_tokens
        self.max_completion = max_completion_tokens
        self.vocab_size = len(tokenizer)
        self.prefix, self.suffix = _special_affixes(tokenizer)
        self.prompt_room = max_prompt_tokens - len(self.prefix) - len(self.suffix)
        if self.prompt_room < 1:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} leaves no room for text next to the "
                f"{len(self.prefix) + len(self.suffix)} special tokens the tokenizer adds. "
                "Raise max_prompt_tokens."
            )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def plain_prompt(self, content: list[int]) -> list[int]:
        """Special tokens around the last ``prompt_room`` content tokens (left truncation)."""
        kept = content[max(0, len(content) - self.prompt_room) :]
        return self.prefix + kept + self.suffix

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.encode(text)[-self.max_prompt :]

    def completion(self, ids: list[int]) -> list[int]:
        return ids[: self.max_completion]


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids ``add_special_tokens=True`` puts before and after a text's own tokens."""
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return special[:start], special[start + len(plain) :]
    raise ValueError(
        f"Cannot tell which special tokens {type(tokenizer).__name__} adds to a prompt: "
        f"{probe!r} encodes to {special} with special tokens and {plain} without."
    )


def _text_windows(path: Path, encoder: _Encoder) -> list[PromptExample]:
    ids = encoder.encode(read_text_file(path, "text file"))
    width = encoder.prompt_room + encoder.max_completion
    examples = []
    for start in range(0, len(ids), width):
        window = ids[start : start + width]
        if len(window) <= encoder.prompt_room:
            break  # the short final window has no completion token
        examples.append(
            PromptExample(
                prompt_ids=encoder.prefix + window[: encoder.prompt_room] + encoder.suffix,
                completion_ids=window[encoder.prompt_room :],
                source=f"{path}:tokens[{start}:{start + len(window)}]",
            )
        )
    return examples


def _builtin_examples(spec: str, encoder: _Encoder) -> list[PromptExample]:
    """The registry's files and records for ``spec``, read like local text files and JSONL."""
    examples = []
    for item in builtin_dataset_items(spec):
        if item.text_file is not None:
            examples.extend(_text_windows(item.text_file, encoder))
        else:
            examples.append(_jsonl_example(item.record or {}, item.where, encoder))
    return examples


def _jsonl_example(record: dict[str, Any], where: str, encoder: _Encoder) -> PromptExample:
    if "prompt" in record and "messages" in record:
        raise ValueError(
            f'{where}: has both "prompt" and "messages"; use one form per line: '
            '{"prompt": ..., "completion": ...} or {"messages": [...]}.'
        )
    completion = None
    if "messages" in record:
        prompt, completion = _chat_parts(record["messages"], where, encoder)
    elif "prompt_ids" in record:
        prompt = _token_ids(record["prompt_ids"], "prompt_ids", where, encoder.vocab_size)
        prompt = prompt[-encoder.max_prompt :]
    else:
        text = record.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f'{where}: missing or empty "prompt" string; each line needs one, e.g. '
                '{"prompt": "Once upon a time", "completion": " there was"}, or a "messages" list.'
            )
        content = encoder.encode(text)
        if not content:
            raise ValueError(f"{where}: the prompt tokenises to no tokens; give it some text.")
        prompt = encoder.plain_prompt(content)
    if "completion_ids" in record:
        ids = _token_ids(record["completion_ids"], "completion_ids", where, encoder.vocab_size)
        completion = encoder.completion(ids)
    elif "completion" in record:
        if completion is not None:
            raise ValueError(
                f'{where}: has both a final assistant message and a "completion"; keep one.'
            )
        text = record["completion"]
        if not isinstance(text, str):
            raise ValueError(f'{where}: "completion" must be a string, got {type(text).__name__}.')
        completion = encoder.completion(encoder.encode(text))
    if not prompt:
        raise ValueError(f"{where}: empty prompt after tokenisation; give it some text.")
    return PromptExample(prompt_ids=prompt, completion_ids=completion, source=where)


def _chat_parts(messages: Any, where: str, encoder: _Encoder) -> tuple[list[int], list[int] | None]:
    """Prompt ids (chat template) and, when the last message is the assistant's, its reply."""
    valid = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not valid:
        raise ValueError(
            f'{where}: "messages" must be a non-empty list of {{"role": str, "content": str}} '
            'objects, e.g. [{"role": "user", "content": "Hi"}, {"role": "assistant", '
            '"content": "Hello"}].'
        )
    if getattr(encoder.tokenizer, "chat_template", None) is None:
        raise ValueError(
            f'{where}: a "messages" line needs a tokenizer with a chat template, and '
            f"{type(encoder.tokenizer).__name__} has none. Use the chat/instruct model's "
            'tokenizer, set tokenizer.chat_template, or write {"prompt", "completion"} lines.'
        )
    completion = None
    if messages[-1]["role"] == "assistant":
        if len(messages) == 1:
            raise ValueError(
                f"{where}: the only message is the assistant's reply; add the user message "
                "(and system prompt) it answers."
            )
        completion = encoder.completion(encoder.encode(messages[-1]["content"]))
        messages = messages[:-1]
    return encoder.chat_prompt(messages), completion


def _token_ids(value: Any, key: str, where: str, vocab_size: int) -> list[int]:
    valid = isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in value
    )
    if not valid:
        raise ValueError(
            f'{where}: "{key}" must be a list of integer token ids in [0, {vocab_size}) for this '
            "tokenizer. Was the file generated with another tokenizer? Regenerate it, or drop "
            f'"{key}" to re-tokenise the text.'
        )
    return value

"""Reading prompt files. Malformed input names the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Data file {path} does not exist.")
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number}: not valid JSON ({error.msg}). Each line must be one "
                    'JSON object, e.g. {"prompt": "Once upon a time"}.'
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}."
                )
            yield line_number, record


def load_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` field of every line of a JSONL file (non-empty strings)."""
    prompts = []
    for line_number, record in read_jsonl(path):
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(
                f'{path}:{line_number}: missing or empty "prompt" string; each line needs '
                'one, e.g. {"prompt": "Once upon a time"}.'
            )
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} contains no prompts.")
    return prompts

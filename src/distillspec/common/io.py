"""Files: the one atomic writer, and JSONL reading whose errors name the file and the line.

``atomic_writer`` / ``atomic_write_text`` write a temporary file beside the destination, fsync it
and ``os.replace`` it into place, so a reader (or a run killed at any moment) sees the old file or
the new one, never half of one. They refuse to write through a symbolic link.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; distillspec does not write through links.")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle_fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would leak into the final file
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(handle_fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path) as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def is_temporary(path: Path) -> bool:
    """Names our atomic writers use for files and folders still being written."""
    return path.name.startswith(".") and path.name.endswith(".tmp") or ".tmp-" in path.name


def read_yaml_mapping(path: str | Path, what: str = "YAML file") -> dict:
    """A YAML file that holds a mapping (empty file: {}). A parse error names the file, line and
    column; a list or a scalar says what it is instead of failing later on a missing key."""
    import yaml

    path = Path(path)
    try:
        value = yaml.safe_load(read_text_file(path, what))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(
            f"{where}: the {what} is not valid YAML ({problem}). Fix that line, or remove the "
            "file to start from the defaults."
        ) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        kind = "a list" if isinstance(value, list) else f"a single {type(value).__name__} value"
        raise ValueError(
            f"{path}: the {what} is {kind}, but it must be a mapping of option: value "
            "(one `name: value` per line)."
        )
    return value


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file; a missing file, a folder or bad bytes give a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a {what}.")
    if not path.is_file():
        raise ValueError(f"The {what} {path} does not exist.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 text (byte {error.start}). Save the file as UTF-8."
        ) from None


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL text, split at "\\n" only (a "\\r" before it dropped).

    Not ``str.splitlines()``: that also splits at U+2028, U+0085, form feeds and more, which a
    JSON string written with ``ensure_ascii=False`` holds raw (a sampled answer can), and would
    cut one record in two.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file."""
    path = Path(path)
    for line_number, line in enumerate(jsonl_lines(read_text_file(path, "data file")), 1):
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

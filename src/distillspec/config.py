"""Configuration dataclasses: the single source of defaults for the CLI, YAML and Python.

Every knob is a dataclass field with ``help`` (and optional ``choices``) in its metadata.
``add_arguments`` turns a dataclass into argparse options, ``from_namespace`` builds the
dataclass back, and ``__post_init__`` validates, so bad values fail the same way whichever
front end set them.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

LENIENCE_CHOICES = ("none", "lin", "sq", "exp")


def knob(default: Any, help: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    """A dataclass field carrying its CLI help text (and choices) in its metadata."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata, **kwargs)


@dataclass(frozen=True)
class SamplingConfig:
    """How a next-token distribution is warped before sampling (shared by draft and target)."""

    temperature: float = knob(0.0, "Sampling temperature; 0 means greedy (argmax, one-hot).")
    top_k: int = knob(0, "Keep only the k most likely tokens (0 disables).")
    top_p: float = knob(
        1.0, "Nucleus sampling: keep the smallest set with mass >= top_p (1 disables)."
    )

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(
                f"temperature must be >= 0, got {self.temperature}. "
                "Use 0 for greedy decoding or a positive value such as 1.0 for sampling."
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"top_p must be in (0, 1], got {self.top_p}. Use 1.0 to disable nucleus sampling."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SpeculationConfig:
    """The speculative-decoding knobs: lookahead and the (optionally lenient) acceptance rule."""

    gamma: int = knob(4, "Draft tokens proposed per target call (lookahead, >= 1).")
    lenience: str = knob(
        "none",
        "Lossy acceptance: none (lossless), lin (p/eps), sq (p/eps^2) or exp (p^eps).",
        choices=LENIENCE_CHOICES,
    )
    epsilon: float = knob(1.0, "Lenience strength in (0, 1]; 1 is exactly lossless.")

    def __post_init__(self) -> None:
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or self.gamma < 1:
            raise ValueError(
                f"gamma must be an integer >= 1, got {self.gamma!r}. It is the number of draft "
                "tokens checked per target call; 3 to 8 is typical."
            )
        if self.lenience not in LENIENCE_CHOICES:
            raise ValueError(
                f"lenience must be one of {', '.join(LENIENCE_CHOICES)}, got {self.lenience!r}."
            )
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(
                f"epsilon must be in (0, 1], got {self.epsilon}. 1 is lossless; smaller values "
                "accept more draft tokens at some cost in quality."
            )


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and in which precision models run."""

    device: str = knob("auto", "Device: auto (CUDA when present), cpu, cuda, cuda:N.")
    dtype: str = knob(
        "auto",
        "Weights dtype: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), "
        "float32, bfloat16, float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    trust_remote_code: bool = knob(
        False, "Allow model repositories to run their own Python code (off by default)."
    )


@dataclass(frozen=True)
class GenerateConfig:
    """``distillspec generate``: what to run on which prompts."""

    target: str = knob("", "Target model: HF folder, .gguf file or builtin:NAME.")
    draft: str = knob(
        "none",
        "Draft model: HF folder, .gguf file, target-layers:N (the target's first N layers) "
        "or none for plain decoding.",
    )
    prompt: str | None = knob(None, "A single prompt text.")
    prompts: str | None = knob(None, 'A JSONL file with one {"prompt": ...} object per line.')
    max_new_tokens: int = knob(64, "New tokens to generate per prompt.")
    batch_size: int = knob(1, "Prompts decoded together in one batch.")
    seed: int = knob(0, "Random seed for sampling (reproducible runs).")
    chat: bool = knob(False, "Render prompts with the tokenizer's chat template.")
    json: bool = knob(False, "Print one JSON object per prompt instead of text.")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")


# ---------------------------------------------------------------------------------------------
# dataclass <-> argparse / dict


def _base_type(annotation: Any) -> type:
    """The scalar type of a field annotation (``int | None`` -> ``int``)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # annotations are our own literals
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--flag`` per field of dataclass ``cls``; defaults are left to the dataclass."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        kind = _base_type(f.type)
        help_text = f.metadata.get("help", "")
        default_text = f" (default: {f.default})"
        if kind is bool:
            group.add_argument(
                flag,
                dest=prefix + f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text + default_text,
            )
        else:
            group.add_argument(
                flag,
                dest=prefix + f.name,
                type=kind,
                default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"),
                help=help_text + default_text,
            )


def from_namespace(cls: type, namespace: argparse.Namespace, prefix: str = "", **base: Any):
    """Build ``cls`` from parsed args: explicit flags override ``base``, which overrides defaults."""
    values = dict(base)
    for f in dataclasses.fields(cls):
        if hasattr(namespace, prefix + f.name):
            values[f.name] = getattr(namespace, prefix + f.name)
    return from_dict(cls, values)


def from_dict(cls: type, values: dict[str, Any]):
    """Build ``cls`` from a plain dict (e.g. YAML), rejecting unknown keys with a clear error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} option(s): {', '.join(unknown)}. "
            f"Valid options are: {', '.join(sorted(names))}."
        )
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(config)

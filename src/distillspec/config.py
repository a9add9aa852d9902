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


def require_at_least(config: Any, minimum: float, *names: str) -> None:
    """Raise a ValueError naming the first field of ``names`` below ``minimum``."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(config, name)}.")


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


DIVERGENCE_CHOICES = ("fkl", "rkl", "jsd", "tvd")
POLICY_CHOICES = ("fixed", "teacher", "draft", "mixed")


@dataclass(frozen=True)
class DistillConfig:
    """``distillspec distill``: a DistillSpec recipe. YAML keys are these field names."""

    target: str = knob(
        "builtin:smollm2-135m", "Target (teacher) model: HF folder, .gguf or builtin:NAME."
    )
    draft_init: str = knob(
        "target-layers:4",
        "Draft initialisation: target-layers:N (the target's first N layers) or a model path "
        "with the same tokenizer.",
    )
    train_embeddings: bool = knob(True, "Train the draft's input embeddings (else frozen).")
    train_lm_head: bool = knob(True, "Train the draft's output head (else frozen).")
    data: str = knob(
        "", "Training prompts: JSONL (prompt/completion or messages), .txt or a folder of .txt."
    )
    eval_data: str | None = knob(
        None, "Held-out prompts file; default: a held-out split of --data."
    )
    held_out: int = knob(
        16, "Prompts held out of --data for evaluation when --eval-data is not set."
    )
    policy: str = knob(
        "draft",
        "Where completions come from: fixed, teacher, draft (on-policy) or mixed.",
        choices=POLICY_CHOICES,
    )
    mix: str = knob(
        "draft=0.5,teacher=0.5", "Fractions for --policy mixed, e.g. draft=0.7,fixed=0.3."
    )
    divergence: str = knob(
        "fkl", "Token-level divergence: fkl, rkl, jsd or tvd.", choices=DIVERGENCE_CHOICES
    )
    jsd_beta: float = knob(0.5, "beta of the generalised JSD, in (0, 1).")
    loss_temperature: float = knob(1.0, "Temperature applied to both logits inside the divergence.")
    sample_temperature: float = knob(1.0, "Temperature for generating teacher/draft completions.")
    max_new_tokens: int = knob(64, "Tokens generated per completion (teacher/draft policies).")
    max_prompt_tokens: int = knob(128, "Prompts are cut (from the left) to this many tokens.")
    max_completion_tokens: int = knob(128, "Dataset completions are cut to this many tokens.")
    batch_size: int = knob(8, "Sequences per micro-batch per process.")
    grad_accum: int = knob(1, "Micro-batches per optimiser step.")
    lr: float = knob(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    warmup_steps: int = knob(10, "Linear warm-up steps before the cosine decay.")
    max_steps: int = knob(100, "Optimiser steps.")
    max_minutes: float = knob(0.0, "Stop after this many minutes of training (0: no limit).")
    clip_grad_norm: float = knob(1.0, "Clip the gradient norm to this value (0 disables).")
    bf16: str = knob(
        "auto",
        "bf16 autocast: auto (CUDA, or CPUs with native bf16), on, off.",
        choices=("auto", "on", "off"),
    )
    eval_every: int = knob(25, "Evaluate alpha (and tau) every N steps (0: only at start and end).")
    eval_prompts: int = knob(16, "Held-out prompts used for alpha.")
    eval_tau_prompts: int = knob(4, "Held-out prompts decoded with SD to measure tau (0 disables).")
    eval_gamma: int = knob(4, "Lookahead used for the tau evaluation.")
    eval_max_new_tokens: int = knob(48, "Target-generated continuation length for evaluation.")
    save_every: int = knob(25, "Write a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = knob(2, "Checkpoints kept on disk (oldest removed).")
    output_dir: str = knob("runs/distill", "Run folder: checkpoints, metrics.jsonl, final draft.")
    resume: bool = knob(False, "Continue from the last checkpoint in --output-dir.")
    seed: int = knob(0, "Seed for data order, sampling and initialisation.")
    device: str = knob("auto", "Device: auto, cpu, cuda.")

    def __post_init__(self) -> None:
        require_at_least(
            self,
            1,
            "batch_size",
            "grad_accum",
            "max_steps",
            "max_new_tokens",
            "max_prompt_tokens",
            "max_completion_tokens",
            "eval_gamma",
            "eval_max_new_tokens",
            "keep_checkpoints",
        )
        require_at_least(
            self,
            0,
            "warmup_steps",
            "eval_every",
            "save_every",
            "eval_tau_prompts",
            "held_out",
            "max_minutes",
            "clip_grad_norm",
            "weight_decay",
        )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(
                f"jsd_beta must be in (0, 1), got {self.jsd_beta}: at 0 and 1 the generalised JSD "
                "is identically 0. Use divergence fkl or rkl for those limits."
            )
        if not self.loss_temperature > 0 or not self.sample_temperature >= 0:
            raise ValueError("loss_temperature must be > 0 and sample_temperature >= 0.")
        if self.policy not in POLICY_CHOICES:
            raise ValueError(
                f"policy must be one of {', '.join(POLICY_CHOICES)}, got {self.policy!r}."
            )
        if self.divergence not in DIVERGENCE_CHOICES:
            raise ValueError(
                f"divergence must be one of {', '.join(DIVERGENCE_CHOICES)}, got {self.divergence!r}."
            )
        if self.policy == "mixed":
            self.mix_fractions()  # validates

    def mix_fractions(self) -> dict[str, float]:
        """Parse ``mix`` ("draft=0.5,teacher=0.5") into {policy: fraction}."""
        fractions: dict[str, float] = {}
        for part in self.mix.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            try:
                fractions[name] = float(value)
            except ValueError:
                raise ValueError(
                    f"Bad mix entry {part!r}: expected name=fraction, e.g. draft=0.5,teacher=0.5."
                ) from None
            if name not in ("fixed", "teacher", "draft"):
                raise ValueError(f"mix names must be fixed, teacher or draft; got {name!r}.")
        return fractions


@dataclass(frozen=True)
class DatagenConfig:
    """``distillspec datagen``: sample target completions once, cache them as JSONL."""

    target: str = knob("builtin:smollm2-135m", "Target model: HF folder, .gguf or builtin:NAME.")
    data: str = knob("", "Prompts: JSONL (prompt or messages), .txt or a folder of .txt.")
    out: str = knob(
        "teacher.jsonl", "Output JSONL (prompt, completion, prompt_ids, completion_ids)."
    )
    temperature: float = knob(1.0, "Sampling temperature (0: greedy).")
    max_new_tokens: int = knob(64, "Tokens per completion.")
    max_prompt_tokens: int = knob(128, "Prompts are cut (from the left) to this many tokens.")
    batch_size: int = knob(8, "Prompts generated together.")
    seed: int = knob(0, "Sampling seed.")
    device: str = knob("auto", "Device: auto, cpu, cuda.")
    dtype: str = knob(
        "auto",
        "Target dtype: auto, float32, bfloat16, float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("datagen needs --data (a prompt file).")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_prompt_tokens < 1:
            raise ValueError("max_new_tokens, batch_size and max_prompt_tokens must be >= 1.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"{name} must be a comma-separated list of integers, got {text!r}."
        ) from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must list integers >= 1, got {text!r}.")
    return values


@dataclass(frozen=True)
class BenchConfig:
    """``distillspec bench``: our SD against transformers (plain and assisted) in one run."""

    target: str = knob("builtin:smollm2-135m", "Target model: HF folder, .gguf or builtin:NAME.")
    draft: str = knob(
        "target-layers:4", "Draft: HF folder, .gguf, builtin:NAME or target-layers:N."
    )
    prompts: str = knob(
        "builtin:chat:heldout", "Prompts: builtin:NAME[:heldout], JSONL (prompt or messages)."
    )
    num_prompts: int = knob(8, "Use the first N prompts.")
    max_prompt_tokens: int = knob(256, "Prompts are cut (from the left) to this many tokens.")
    gammas: str = knob("1,2,4,6", "Comma-separated lookaheads to compare.")
    temperatures: str = knob("0,1", "Comma-separated temperatures (0 = greedy).")
    batch_sizes: str = knob("1,4", "Comma-separated batch sizes.")
    max_new_tokens: int = knob(48, "New tokens per prompt.")
    stop_at_eos: bool = knob(
        False, "Stop rows at EOS (off: every method generates exactly max_new_tokens)."
    )
    repeats: int = knob(3, "Timed repeats after one warm-up; the median is reported.")
    seed: int = knob(0, "Sampling seed.")
    out: str = knob("bench-results", "Output folder: bench.json, bench.md, bench.png.")
    question_file: str | None = knob(
        None, "Spec-Bench question.jsonl to answer with our SD (batch 1)."
    )
    answer_file: str | None = knob(
        None, "Where to write Spec-Bench answers (default: OUT/answers.jsonl)."
    )
    device: str = knob("auto", "Device: auto, cpu, cuda.")
    dtype: str = knob(
        "auto",
        "dtype: auto, float32, bfloat16, float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )

    def __post_init__(self) -> None:
        self.gamma_list(), self.batch_size_list(), self.temperature_list()
        require_at_least(self, 1, "num_prompts", "max_new_tokens", "repeats", "max_prompt_tokens")

    def gamma_list(self) -> list[int]:
        return _int_list(self.gammas, "gammas")

    def batch_size_list(self) -> list[int]:
        return _int_list(self.batch_sizes, "batch_sizes")

    def temperature_list(self) -> list[float]:
        try:
            values = [float(v) for v in str(self.temperatures).split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"temperatures must be comma-separated numbers, got {self.temperatures!r}."
            ) from None
        if not values or min(values) < 0:
            raise ValueError(f"temperatures must be >= 0, got {self.temperatures!r}.")
        return values


@dataclass(frozen=True)
class DemoConfig:
    """``distillspec demo``: measure, distil on-policy within a time budget, measure again."""

    minutes: float = knob(12.0, "Training budget in minutes (measurement time comes on top).")
    out: str = knob(
        "runs/demo", "Output folder: report.json, plots, the distilled draft (run/final)."
    )
    fresh: bool = knob(False, "Discard the previous demo run and its distilled draft.")
    target: str = knob("builtin:smollm2-135m", "Target model.")
    draft_init: str = knob(
        "target-layers:4", "Draft initialisation (target-layers:N or a model path)."
    )
    data: str = knob("builtin:chat", "Training prompts.")
    eval_data: str = knob("builtin:chat:heldout", "Held-out prompts for every measurement.")
    policy: str = knob(
        "target-greedy",
        "Distillation data: draft (on-policy samples), target-greedy (the target's greedy "
        "answers, generated once inside the budget) or mixed-greedy (half each).",
        choices=("draft", "target-greedy", "mixed-greedy"),
    )
    divergence: str = knob(
        "fkl", "Divergence for distillation.", choices=("fkl", "rkl", "jsd", "tvd")
    )
    lr: float = knob(1e-3, "Peak learning rate.")
    batch_size: int = knob(8, "Prompts per training step.")
    train_new_tokens: int = knob(
        64, "Completion tokens per training prompt (from the target or the draft)."
    )
    max_prompt_tokens: int = knob(128, "Prompts are cut (from the left) to this many tokens.")
    max_new_tokens: int = knob(64, "Tokens generated per held-out prompt when measuring.")
    eval_prompts: int = knob(12, "Held-out prompts for alpha.")
    speed_prompts: int = knob(4, "Held-out prompts decoded to measure tokens/s and tau.")
    gammas: str = knob("1,2,3,4,6", "Lookaheads measured before and after.")
    repeats: int = knob(2, "Timed SD runs per gamma (median); target-alone runs are interleaved.")
    eval_every: int = knob(20, "Evaluate (and checkpoint) every N training steps.")
    seed: int = knob(0, "Seed.")
    device: str = knob("auto", "Device: auto, cpu, cuda.")
    dtype: str = knob(
        "auto",
        "dtype: auto (bf16 where native), float32, bfloat16.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}.")
        require_at_least(
            self,
            1,
            "batch_size",
            "train_new_tokens",
            "max_prompt_tokens",
            "max_new_tokens",
            "eval_prompts",
            "speed_prompts",
            "repeats",
            "eval_every",
        )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        self.gamma_list()

    def gamma_list(self) -> list[int]:
        return _int_list(self.gammas, "gammas")

    def command_line(self) -> str:
        """The flags that differ from the defaults (for reports)."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                flag = "--" + f.name.replace("_", "-")
                parts.append(flag if value is True else f"{flag} {value}")
        return " ".join(parts)

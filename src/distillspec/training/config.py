"""The distillation recipe (``DistillConfig``) and the teacher-data job (``DatagenConfig``).

One declaration per knob; YAML keys are the field names (``runtime:`` is a nested mapping,
``--device``/``--dtype``/``--threads`` on the command line). No torch here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from distillspec.common.config import knob, require_at_least, require_at_most, section
from distillspec.common.runtime import RuntimeConfig, refuse_draft_quantize
from distillspec.decoding.params import MAX_GAMMA, check_seed

DEFAULT_TARGET = "builtin:smollm2-135m"
DIVERGENCE_CHOICES = ("fkl", "rkl", "jsd", "tvd", "lk")
POLICY_CHOICES = ("fixed", "teacher", "draft", "mixed", "warm")
SHARDING_CHOICES = ("none", "fsdp")
OPENER_CHOICES = ("none", "tasks")  # datagen.prompt_openers
MAX_BATCH = 4096
ATTENTION_CHOICES = ("auto", "eager", "sdpa")
MAX_TOKENS = 1 << 17  # per prompt, per completion: far past any context we load
MODEL_SPECS = "an HF folder, a .gguf file or builtin:NAME"


def target_knob(role: str = "Target model") -> str:
    """The one declaration of the target-model knob (every command has one)."""
    return knob(DEFAULT_TARGET, f"{role}: {MODEL_SPECS}.")


def parse_train_layers(spec: str, layer_count: int | None) -> list[int] | None:
    """``all`` -> None (every layer trains); ``last:N`` -> the last N indices; ``i,j,...`` ->
    those indices. ``layer_count`` None checks the syntax only (the draft is not built yet)."""
    value = spec.strip()
    if value == "all":
        return None
    count_text = value[5:] if value.startswith("last:") else None
    parts = [count_text] if count_text is not None else value.split(",")
    if not all(part.strip().isdigit() for part in parts):
        raise ValueError(
            f"train_layers {spec!r} is not all, last:N or i,j,... (decoder layer indices of the "
            "draft), e.g. last:4 or 20,21,22,23."
        )
    numbers = [int(part) for part in parts]
    if count_text is not None and numbers[0] < 1:
        raise ValueError(f"train_layers {spec!r}: last:N needs N >= 1.")
    if layer_count is None:
        return numbers
    if count_text is not None:
        if numbers[0] > layer_count:
            raise ValueError(f"train_layers {spec!r}: the draft has only {layer_count} layers; "
                             f"use last:{layer_count} or all.")
        return list(range(layer_count - numbers[0], layer_count))
    if max(numbers) >= layer_count:
        raise ValueError(f"train_layers {spec!r}: the draft's layers are 0..{layer_count - 1}; "
                         f"{max(numbers)} is not one of them.")
    return sorted(set(numbers))


@dataclass(frozen=True)
class DistillConfig:
    """``distillspec distill``: a DistillSpec recipe. YAML keys are these field names."""

    target: str = target_knob("Target (teacher) model")
    draft_init: str = knob(
        "target-layers:4",
        "Draft initialisation: target-layers:N (the target's first N layers), "
        "target-layers:i,j,... (those layers) or a model path with the same tokenizer.",
    )
    train_embeddings: bool = knob(True, "Train the draft's input embeddings (else frozen).")
    train_lm_head: bool = knob(True, "Train the draft's output head (else frozen).")
    train_layers: str = knob(
        "all",
        "Which of the draft's decoder layers train: all, last:N (its last N layers, the "
        "earlier ones frozen: with frozen embeddings backward stops at the first trained "
        "layer) or i,j,... (those indices of the draft's layers). The final norm always trains.",
    )
    data: str = knob(
        "", "Training prompts: JSONL (prompt/completion or messages), .txt, a folder of .txt "
        "or builtin:NAME."
    )
    eval_data: str | None = knob(
        None, "Held-out prompts file; default: a held-out split of --data."
    )
    held_out: int = knob(
        16, "Prompts held out of --data for evaluation when --eval-data is not set."
    )
    policy: str = knob(
        "draft",
        "Where completions come from: fixed, teacher, draft (on-policy), mixed, or warm (the "
        "data's fixed completions, or teacher_cache, for the first warm_fraction of the budget, "
        "then on-policy).",
        choices=POLICY_CHOICES,
    )
    warm_fraction: float = knob(
        0.25,
        "For --policy warm: the fraction of the budget (of max_steps, or of max_minutes when "
        "that ends the run first) trained on the cached target answers before switching to "
        "on-policy draft samples, in (0, 1).",
    )
    mix: str = knob(
        "draft=0.5,teacher=0.5", "Fractions for --policy mixed, e.g. draft=0.7,fixed=0.3."
    )
    teacher_cache: bool = knob(
        False,
        "Generate the teacher's completions once, in batches, before training (cached in the "
        "run folder) and reuse them every epoch instead of sampling the target every step. "
        "Needs policy teacher, a mix with teacher, or warm (its first phase then replays them).",
    )
    teacher_topk: int = knob(
        0,
        "Score the fixed training data with the target once and keep its top-k log-probs per "
        "completion token; steps then run no target forward (fkl: the target renormalised over "
        "those k ids; the other divergences: the k ids plus one tail bucket with the rest of "
        "the mass, at loss_temperature 1). Needs policy fixed, teacher with teacher_cache, warm, "
        "or a mix with fixed (its on-policy batches run the target live). "
        "0: the exact full-softmax target forward every step.",
    )
    teacher_topk_dir: str = knob(
        "",
        "Folder for the teacher_topk cache instead of the run folder, one file per data, k and "
        "kept vocabulary (named by their fingerprint), so runs on the same data score it once. "
        "The demo keeps it beside its cached training data.",
    )
    divergence: str = knob(
        "fkl",
        "Token-level divergence (P = target, Q = draft): fkl KL(P||Q), rkl KL(Q||P), jsd "
        "(jsd_beta), tvd, or lk: -log sum min(P, Q), minus the log of the acceptance rate "
        "(mixed with fkl by lk_kl_weight).",
        choices=DIVERGENCE_CHOICES,
    )
    jsd_beta: float = knob(0.5, "beta of the generalised JSD, in (0, 1).")
    lk_kl_weight: float = knob(
        0.0, "Divergence lk only: weight w of forward KL in (1 - w) lk + w fkl, in [0, 1]."
    )
    loss_temperature: float = knob(1.0, "Temperature applied to both logits inside the divergence.")
    filter_reference: str | None = knob(
        None,
        "Token filter (AdaSPEC): a reference draft already distilled for this target (a model "
        "path, or target-layers:N), loaded like draft_init. Each micro-batch keeps only the "
        "filter_keep fraction of its tokens where the draft's divergence exceeds the "
        "reference's the most. Needs filter_keep < 1.",
    )
    filter_keep: float = knob(
        1.0,
        "Fraction of each micro-batch's completion tokens kept in the loss by the token filter, "
        "ceil(filter_keep * n), in (0, 1]; 1 keeps all. Below 1 it needs filter_reference.",
    )
    sample_temperature: float = knob(1.0, "Temperature for generating teacher/draft completions.")
    max_new_tokens: int = knob(64, "Tokens generated per completion (teacher/draft policies).")
    max_prompt_tokens: int = knob(128, "Prompts are cut (from the left) to this many tokens.")
    max_completion_tokens: int = knob(128, "Dataset completions are cut to this many tokens.")
    batch_size: int = knob(8, "Sequences per micro-batch per process.")
    grad_accum: int = knob(1, "Micro-batches per optimiser step.")
    length_grouping: int = knob(
        16,
        "Sort each run of N global batches of the shuffled training stream by sequence length "
        "and take the re-cut batches in a seeded random order, so a batch pads less (same "
        "examples, fewer padded columns, more steps per minute). 0 or 1: off.",
    )
    lr: float = knob(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    warmup_steps: int = knob(10, "Linear warm-up steps before the cosine decay.")
    max_steps: int = knob(
        100,
        "Optimiser steps. 0 trains nothing: the run only builds the draft from draft_init (e.g. "
        "a :vocab=K head counted from the target's outputs on the data), evaluates and saves it.",
    )
    max_minutes: float = knob(0.0, "Stop after this many minutes of training (0: no limit).")
    clip_grad_norm: float = knob(1.0, "Clip the gradient norm to this value (0 disables).")
    sharding: str = knob(
        "none",
        "How the draft is spread over processes: none (each process holds it whole; several "
        "processes train data-parallel) or fsdp (PyTorch FSDP2: parameters, gradients and "
        "optimiser state sharded over the processes of torchrun/accelerate launch; the target "
        "is sharded by target_sharding). Checkpoints are whole either way, so a run resumes on "
        "any number of processes.",
        choices=SHARDING_CHOICES,
    )
    target_sharding: str = knob(
        "none",
        "How the frozen target is spread over processes, whatever sharding does with the draft: "
        "none (whole on each process) or fsdp (PyTorch FSDP2, no gradients or optimiser state: "
        "each of N processes holds 1/N of its weights; the training steps' target forwards run "
        "on all processes together, and the whole target is gathered only while sampling live "
        "teacher answers or measuring tau). Needs torchrun/accelerate launch.",
        choices=SHARDING_CHOICES,
    )
    bf16: str = knob(
        "auto",
        "bf16 autocast: auto (CUDA, or CPUs with native bf16), on, off.",
        choices=("auto", "on", "off"),
    )
    train_attention: str = knob(
        "auto",
        "Attention of the draft's training forwards: auto (eager on CPU for micro-batches of at "
        "most 256 columns, where it was measured faster than the fused kernel; the model's own "
        "elsewhere), eager or sdpa. Evaluation and decoding are not affected.",
        choices=ATTENTION_CHOICES,
    )
    eval_every: int = knob(25, "Evaluate alpha (and tau) every N steps (0: only at start and end).")
    eval_prompts: int = knob(16, "Held-out prompts used for alpha.")
    eval_tau_prompts: int = knob(4, "Held-out prompts decoded with SD to measure tau (0 disables).")
    eval_gamma: int = knob(4, "Lookahead used for the tau evaluation.")
    eval_max_new_tokens: int = knob(48, "Target-generated continuation length for evaluation.")
    save_every: int = knob(25, "Write a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = knob(2, "Checkpoints kept on disk (oldest removed).")
    output_dir: str = knob("runs/distill", "Run folder: checkpoints, metrics.jsonl, final draft.")
    resume: bool = knob(False, "Continue from the last complete checkpoint in --output-dir.")
    overwrite: bool = knob(
        False, "Start over in an existing run folder: removes only what earlier runs wrote there."
    )
    log_with: list[str] = knob(
        [], "Extra trackers for accelerate (tensorboard, wandb, trackio, ...); metrics.jsonl "
        "is always written."
    )
    seed: int = knob(0, "Seed for data order, sampling and initialisation.")
    runtime: RuntimeConfig = section(RuntimeConfig, flat=True)

    def __post_init__(self) -> None:
        refuse_draft_quantize(self.runtime, "distill (and demo, study: they train the draft)")
        self._check_ranges()
        self._check_loss_knobs()
        self._check_choices()
        self._check_data_sources()

    def _check_ranges(self) -> None:
        """Counts, lengths and rates within their bounds."""
        require_at_least(
            self, 1, "batch_size", "grad_accum", "max_new_tokens",
            "max_prompt_tokens", "max_completion_tokens", "eval_gamma", "eval_max_new_tokens",
            "keep_checkpoints", "eval_prompts",
        )
        require_at_least(
            self, 0, "max_steps", "warmup_steps", "eval_every", "save_every", "eval_tau_prompts",
            "held_out", "max_minutes", "clip_grad_norm", "weight_decay", "length_grouping",
        )
        require_at_most(self, MAX_BATCH, "batch_size", "grad_accum", "eval_prompts",
                        "length_grouping")
        require_at_most(
            self, MAX_TOKENS, "max_new_tokens", "max_prompt_tokens", "max_completion_tokens",
            "eval_max_new_tokens",
        )
        require_at_most(self, MAX_GAMMA, "eval_gamma")
        check_seed(self.seed)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")

    def _check_loss_knobs(self) -> None:
        """The divergences' parameters, the token filter, the trained layers, temperatures."""
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(
                f"jsd_beta must be in (0, 1), got {self.jsd_beta}: at 0 and 1 the generalised JSD "
                "is identically 0. Use divergence fkl or rkl for those limits."
            )
        if not 0.0 <= self.lk_kl_weight <= 1.0:
            raise ValueError(
                f"lk_kl_weight must be in [0, 1], got {self.lk_kl_weight}: the lk loss is "
                "(1 - w) (-log acceptance) + w KL(target || draft); 0 is the pure acceptance loss."
            )
        self._check_filter()
        parse_train_layers(self.train_layers, None)
        if not self.loss_temperature > 0 or not self.sample_temperature >= 0:
            raise ValueError("loss_temperature must be > 0 and sample_temperature >= 0.")

    def _check_choices(self) -> None:
        """Named choices (policy, divergence, attention) and the run-folder flags."""
        if self.policy not in POLICY_CHOICES:
            raise ValueError(
                f"policy must be one of {', '.join(POLICY_CHOICES)}, got {self.policy!r}."
            )
        if self.divergence not in DIVERGENCE_CHOICES:
            raise ValueError(
                f"divergence must be one of {', '.join(DIVERGENCE_CHOICES)}, got {self.divergence!r}."
            )
        if self.train_attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"train_attention must be one of {', '.join(ATTENTION_CHOICES)}, got "
                f"{self.train_attention!r} (auto lets the trainer pick per micro-batch)."
            )
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: pick one.")
        if self.policy == "mixed":  # parsed here (a clear error before anything loads), once
            self.mix_fractions()

    def _check_data_sources(self) -> None:
        """The teacher cache, the top-k cache and the warm start fit the data policy."""
        require_at_least(self, 0, "teacher_topk")
        require_at_most(self, 4096, "teacher_topk")
        fixed_data = self.replays_completions
        if self.teacher_topk and not fixed_data:
            raise ValueError(
                "teacher_topk caches the target's distribution on fixed completions, so it needs "
                "policy fixed, teacher with teacher_cache, warm, or a mix with fixed (its "
                "on-policy batches run the target live); set teacher_topk 0 for the exact "
                "target forward every step."
            )
        if self.teacher_topk and self.divergence != "fkl" and self.loss_temperature != 1.0:
            raise ValueError(
                f"divergence {self.divergence} against the teacher_topk cache needs "
                "loss_temperature 1: the cache holds the target's log-probs at temperature 1, "
                "and the tail bucket's mass at another temperature depends on the uncached ids. "
                "Use loss_temperature 1, divergence fkl, or teacher_topk 0."
            )
        if not 0.0 < self.warm_fraction < 1.0:
            raise ValueError(
                f"warm_fraction must lie in (0, 1), got {self.warm_fraction}: 0 is policy draft "
                "(on-policy from the start) and 1 policy fixed (cached answers only)."
            )
        if self.teacher_cache and not (self.uses_teacher or self.policy == "warm"):
            raise ValueError(
                "teacher_cache caches the teacher policy's completions, but this recipe never "
                "samples the teacher. Use policy teacher (or a mix with teacher, or warm), or drop it."
            )

    @property
    def replays_completions(self) -> bool:
        """Whether some batches replay fixed completions (the data's, or teacher_cache's): what a
        teacher_topk cache scores. On-policy batches of a mixed or warm policy have no cache."""
        if self.policy == "mixed":
            parts = self.mix_fractions()
            return "fixed" in parts or ("teacher" in parts and self.teacher_cache)
        return self.policy in ("fixed", "warm") or (self.policy == "teacher" and self.teacher_cache)

    def _check_filter(self) -> None:
        if not 0.0 < self.filter_keep <= 1.0:
            raise ValueError(
                f"filter_keep must be in (0, 1], got {self.filter_keep}: the fraction of each "
                "micro-batch's tokens kept in the loss (1 keeps all)."
            )
        if self.filter_keep < 1.0 and not self.filter_reference:
            raise ValueError(
                f"filter_keep {self.filter_keep} drops the tokens a reference draft finds hardest, "
                "but filter_reference is not set. Name a draft already distilled for this target "
                "(a model path), or use filter_keep 1."
            )
        if self.filter_reference and self.filter_keep == 1.0:
            raise ValueError(
                "filter_reference is only used by the token filter, which filter_keep 1 turns off "
                "(every token kept). Set filter_keep below 1 (e.g. 0.5), or drop filter_reference."
            )

    def divergence_options(self) -> dict[str, float]:
        """The keyword options of ``divergences.get_divergence`` for this recipe."""
        options: dict[str, float] = {"temperature": self.loss_temperature}
        if self.divergence == "jsd":
            options["beta"] = self.jsd_beta
        if self.divergence == "lk":
            options["kl_weight"] = self.lk_kl_weight
        return options

    @property
    def uses_teacher(self) -> bool:
        return self.policy == "teacher" or (
            self.policy == "mixed" and "teacher" in self.mix_fractions()
        )

    def mix_fractions(self) -> dict[str, float]:
        """``mix`` as {policy: fraction} (a copy of the one parse of this text)."""
        return dict(_parse_mix(self.mix))


@functools.lru_cache(maxsize=64)
def _parse_mix(mix: str) -> dict[str, float]:
    """Parse ``mix`` ("draft=0.5,teacher=0.5") into {policy: fraction}."""
    fractions: dict[str, float] = {}
    for part in mix.split(","):
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

    target: str = target_knob()
    data: str = knob("", "Prompts: JSONL (prompt or messages), .txt, a folder of .txt or builtin:NAME.")
    out: str = knob(
        "teacher.jsonl", "Output JSONL (prompt, completion, prompt_ids, completion_ids)."
    )
    overwrite: bool = knob(
        False, "Replace --out if it exists (only a file datagen wrote), and discard the "
        "unfinished shards of another job in OUT.parts/ instead of refusing."
    )
    shard_prompts: int = knob(
        256,
        "Prompts per shard. Shards are dealt over the ranks (torchrun / accelerate launch) and "
        "each is written to OUT.parts/ when done, so a killed run redoes only unfinished shards; "
        "the merged --out is the same on any number of ranks. A shard should hold several "
        "batches (it drains its batch at its end).",
    )
    self_prompts: int = knob(
        0,
        "Instead of completions, write N user prompts the target generates itself from its "
        "chat template (Magpie): de-duplicated, seeded; --data is not needed.",
    )
    prompt_openers: str = knob(
        "none",
        "With --self-prompts: the first words of each prompt, cycled. none: the target's own "
        "(plain Magpie); tasks: generic request types (Write, Explain, List, Compare, ...).",
        choices=OPENER_CHOICES,
    )
    temperature: float = knob(1.0, "Sampling temperature (0: greedy).")
    max_new_tokens: int = knob(64, "Tokens per completion.")
    max_prompt_tokens: int = knob(128, "Prompts are cut (from the left) to this many tokens.")
    batch_size: int = knob(8, "Prompts generated together.")
    seed: int = knob(0, "Sampling seed.")
    runtime: RuntimeConfig = section(RuntimeConfig, flat=True)

    def __post_init__(self) -> None:
        refuse_draft_quantize(self.runtime, "datagen (the target alone generates)")
        if not self.data and not self.self_prompts:
            raise ValueError(
                "datagen needs --data (a prompt file or builtin:NAME), or --self-prompts N."
            )
        check_seed(self.seed)
        require_at_least(self, 1, "max_new_tokens", "batch_size", "max_prompt_tokens",
                         "shard_prompts")
        require_at_least(self, 0, "self_prompts")
        if self.prompt_openers not in OPENER_CHOICES:
            raise ValueError(f"prompt_openers must be one of {', '.join(OPENER_CHOICES)}, "
                             f"got {self.prompt_openers!r}.")
        require_at_most(self, 1_000_000, "self_prompts")
        require_at_most(self, MAX_BATCH, "batch_size")
        require_at_most(self, MAX_TOKENS, "max_new_tokens", "max_prompt_tokens")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")

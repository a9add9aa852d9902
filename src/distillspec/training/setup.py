"""Everything a distillation run needs before its first step, checked in the safe order.

1. ``check_inputs``: the target and data exist and the requested trackers are installed
   (cheap checks, nothing loaded, nothing written);
2. ``open_run_folder``: the output folder is ours or refused; the start / resume / overwrite
   decision is made here, before any model loads;
3. models, data, policy, optimiser and schedule (``trainable_draft``, ``load_data``,
   ``make_scheduler``).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillspec.common.rundir import RunFolder, claim
from distillspec.common.runtime import autocast_bf16, load_options
from distillspec.models.drafts import parse_layer_spec, split_vocab_option
from distillspec.models.loading import (
    build_draft,
    check_model_spec,
    eos_token_ids,
    load_model,
    pad_token_id,
)
from distillspec.models.pruned_head import frequent_tokens
from distillspec.models.registry import BUILTIN_PREFIX
from distillspec.training import checkpoint, teacher_topk
from distillspec.training.builtin_data import check_builtin_dataset
from distillspec.training.config import DistillConfig, parse_train_layers
from distillspec.training.datagen import teacher_cache
from distillspec.training.datasets import load_examples, split_examples
from distillspec.training.evaluate import SDEvaluator

RUN_ENTRIES = (
    "checkpoints", "final", "metrics.jsonl", "distill_config.json", "trackers",
    "teacher-cache.jsonl", "vocab-sample.jsonl", "teacher-topk.safetensors", "teacher-topk.json",
    "teacher-topk.parts",
)


@dataclass
class TrainState:
    """Everything besides weights and optimiser that a resumed run needs."""

    step: int = 0
    examples_seen: int = 0  # position in the (seeded, per-epoch shuffled) training order
    train_seconds: float = 0.0
    data_seconds: float = 0.0  # generating the target's completions once (teacher_cache)


def check_data(spec: str, what: str) -> None:
    if spec.startswith(BUILTIN_PREFIX):
        check_builtin_dataset(spec)
    elif not Path(spec).exists():
        raise ValueError(f"The {what} {spec} does not exist.")


def check_inputs(config: DistillConfig) -> None:
    """Fail before anything is loaded or written: models, data and trackers must exist."""
    check_model_spec(config.target, config.runtime.allow_download)
    check_model_spec(config.draft_init, config.runtime.allow_download)
    layers = parse_layer_spec(split_vocab_option(config.draft_init)[0])
    if layers is not None:  # a layer-subset draft's depth is known before any loading
        parse_train_layers(config.train_layers, len(layers))
    if config.filter_reference:
        check_model_spec(config.filter_reference, config.runtime.allow_download)
    if not config.data:
        raise ValueError("No training data: set data (a JSONL file, a .txt file, a folder or builtin:NAME).")
    check_data(config.data, "training data")
    if config.teacher_topk_dir and Path(config.teacher_topk_dir).expanduser().is_file():
        raise ValueError(
            f"teacher_topk_dir {config.teacher_topk_dir} is a file; it must be a folder (created "
            "if missing) that holds the cached top-k files."
        )
    if config.eval_data:
        check_data(config.eval_data, "evaluation data")
    if config.log_with:
        from accelerate.tracking import get_available_trackers

        available = {str(t) for t in get_available_trackers()}
        missing = [t for t in config.log_with if t not in available and t != "all"]
        if missing:
            raise ValueError(
                f"log_with names {', '.join(missing)}, which is not installed here (available: "
                f"{', '.join(sorted(available)) or 'none'}). Install it or drop it from log_with."
            )


def open_run_folder(config: DistillConfig, main_process: bool = True) -> tuple[RunFolder, Path | None]:
    """Claim the output folder and decide: a fresh start, or the checkpoint to resume from."""
    folder = claim(config.output_dir, "distill", fresh=config.overwrite and main_process)
    folder.refuse_links(*RUN_ENTRIES)
    checkpoints = folder.path / "checkpoints"
    if not config.resume:
        if checkpoint.has_run_state(folder.path):
            raise ValueError(
                f"{folder.path} holds an earlier distillation run. Pass --resume to continue it, "
                "--overwrite to start over (only the files runs wrote there are removed), or "
                "choose another --output-dir."
            )
        return folder, None
    found = checkpoint.find_resumable(checkpoints)
    for problem in found.skipped:
        print(f"distillspec: warning: skipping damaged checkpoint {problem}", file=sys.stderr)
    if found.folder is None:
        if checkpoint.has_run_state(folder.path):
            raise ValueError(
                f"--resume: {folder.path} holds run state but no complete checkpoint to resume "
                "from. Use --overwrite to start over or choose another --output-dir."
            )
        print(f"distillspec: --resume: nothing to resume in {folder.path}; starting at step 0.",
              file=sys.stderr)
        return folder, None
    if found.skipped:
        print(f"distillspec: resuming from the previous complete checkpoint {found.folder.name}.",
              file=sys.stderr)
    return folder, found.folder


def target_dtype(config: DistillConfig, device: torch.device) -> torch.dtype:
    """The dtype ``distill`` runs the target in: bf16 where autocast runs, else float32."""
    return torch.bfloat16 if autocast_bf16(config.bf16, device) else torch.float32


def _load_options(config: DistillConfig, device: torch.device) -> dict[str, Any]:
    """How the target loads: on the run's device, in ``target_dtype``."""
    dtype = "bfloat16" if target_dtype(config, device) == torch.bfloat16 else "float32"
    return {**load_options(config.runtime), "device": device, "dtype": dtype}


def load_target(config: DistillConfig) -> tuple[torch.nn.Module, Any]:
    """The target and its tokenizer exactly as ``distill`` would load them, to load once and
    pass to several ``distill(config, target=..., tokenizer=...)`` runs (a recipe study)."""
    from accelerate import PartialState

    device = PartialState(cpu=config.runtime.device == "cpu").device
    return load_model(config.target, **_load_options(config, device))


def run_target(config: DistillConfig, device: torch.device, target, tokenizer):
    """The given target (checked: the device and dtype this recipe runs it in), or a loaded one."""
    options = _load_options(config, device)
    if target is None:
        return load_model(config.target, **options)
    if tokenizer is None:
        raise ValueError("distill got a target without its tokenizer: pass both, or neither.")
    dtype = target_dtype(config, device)
    if target.device.type != torch.device(device).type or target.dtype != dtype:
        raise ValueError(
            f"distill got a target on {target.device} in {target.dtype}, but this recipe runs it "
            f"on {device} in {dtype}. Load it with training.setup.load_target(config)."
        )
    return target, tokenizer


def freeze_layers(draft, spec: str) -> None:
    """Freeze every decoder layer of ``draft`` that ``spec`` (``train_layers``) leaves out.
    With frozen embeddings too, autograd stops at the first trained layer: a draft that trains
    its last few layers runs backward through those alone."""
    if spec.strip() == "all":
        return
    layers = getattr(getattr(draft, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"train_layers {spec!r} needs a decoder-only draft with "
                         f"model.model.layers; {type(draft).__name__} has none. Use all.")
    trained = parse_train_layers(spec, len(layers))
    for index, layer in enumerate(layers):
        layer.requires_grad_(index in trained)


def trainable_draft(config: DistillConfig, target, tokenizer, token_ids=None):
    """The draft to train, in float32, with the chosen parameters trainable (``token_ids``:
    the kept vocabulary of a ``:vocab=K`` draft)."""
    draft = build_draft(config.draft_init, target, tokenizer, dtype=torch.float32,
                        token_ids=token_ids)
    freeze_layers(draft, config.train_layers)
    draft.get_input_embeddings().weight.requires_grad_(config.train_embeddings)
    draft.get_output_embeddings().weight.requires_grad_(config.train_lm_head)
    if draft.config.tie_word_embeddings and config.train_embeddings != config.train_lm_head:
        raise ValueError(
            "This draft ties its input embeddings and output head, so train_embeddings and "
            "train_lm_head must be equal. Set both to true or both to false."
        )
    return draft.train()


def filter_reference(config: DistillConfig, target, tokenizer, token_ids=None):
    """The token filter's reference draft (None without one): built like the draft, in the
    target's dtype, frozen; pruned to the draft's kept ids (``token_ids``) so that both are
    compared with the same restricted target."""
    if not config.filter_reference:
        return None
    reference = build_draft(config.filter_reference, target, tokenizer, token_ids=token_ids,
                            allow_download=config.runtime.allow_download)
    return reference.requires_grad_(False).eval()


def draft_vocabulary(config: DistillConfig, completions, eos_ids, vocab_size: int):
    """The kept ids of a ``:vocab=K`` draft: the K tokens the target emits most in
    ``completions`` (its own outputs on training prompts), EOS ids always included."""
    keep = split_vocab_option(config.draft_init)[1]
    if keep is None:
        return None
    return frequent_tokens(completions, keep, vocab_size, always=eos_ids)


def load_data(config: DistillConfig, tokenizer) -> tuple[list, list]:
    """(training examples, held-out examples): ``eval_data``'s, or a seeded split of ``data``."""
    examples = load_examples(config.data, tokenizer, **_limits(config))
    if config.eval_data:
        return examples, held_out_examples(config, tokenizer)
    return split_examples(examples, config.held_out, config.seed)


def held_out_examples(config: DistillConfig, tokenizer) -> list:
    """The held-out examples alone: with ``eval_data`` the training data is not read at all."""
    if config.eval_data:
        return load_examples(config.eval_data, tokenizer, **_limits(config))
    return load_data(config, tokenizer)[1]


def _limits(config: DistillConfig) -> dict[str, int]:
    return dict(max_prompt_tokens=config.max_prompt_tokens,
                max_completion_tokens=config.max_completion_tokens)


def evaluation_settings(config: DistillConfig) -> dict[str, Any]:
    """The knobs an evaluator is built from: two runs with equal settings (and the same target)
    evaluate on the same target continuations, so they may share one evaluator."""
    names = ("target", "eval_data", "eval_prompts", "eval_max_new_tokens", "eval_tau_prompts",
             "eval_gamma", "seed", "max_prompt_tokens", "max_completion_tokens")
    settings = {name: getattr(config, name) for name in names}
    if not config.eval_data:  # held out from the training data by a seeded split
        settings.update(data=config.data, held_out=config.held_out)
    return settings


def make_evaluator(config: DistillConfig, target, tokenizer, eval_examples=None) -> SDEvaluator:
    """The run's evaluator: alpha on the held-out prompts, tau if asked. A caller that runs
    several recipes with the same evaluation settings on one loaded target builds it once and
    passes it to each ``distill(..., evaluator=)``: the target's held-out continuations and
    logits are then computed once, not once per run."""
    if eval_examples is None:
        eval_examples = held_out_examples(config, tokenizer)
    return SDEvaluator(
        target, [e.prompt_ids for e in eval_examples[: config.eval_prompts]],
        max_new_tokens=config.eval_max_new_tokens, tau_prompts=config.eval_tau_prompts,
        gamma=config.eval_gamma, eos_token_id=eos_token_ids(target, tokenizer),
        seed=config.seed, pad_id=pad_token_id(tokenizer), settings=evaluation_settings(config),
    )


def check_evaluator(config: DistillConfig, evaluator: SDEvaluator | None, target) -> None:
    """A shared evaluator (``distill(..., evaluator=)``) must hold the target passed with it and
    have been built for this recipe's evaluation settings."""
    if evaluator is None:
        return
    if evaluator.target is not target:
        raise ValueError(
            "The evaluator passed to distill holds another target than the one passed (or distill "
            "would load its own): pass the target the evaluator was built with, "
            "setup.make_evaluator(config, target, tokenizer), or pass no evaluator."
        )
    if evaluator.settings != evaluation_settings(config):
        raise ValueError(
            "The evaluator passed to distill was built for other evaluation settings "
            f"({evaluator.settings}) than this recipe's ({evaluation_settings(config)}): "
            "build it with setup.make_evaluator(config, target, tokenizer) for this recipe, or "
            "pass none."
        )


def make_scheduler(optimizer, config: DistillConfig, state: TrainState | None = None):
    """Linear warm-up to the peak lr, then cosine decay to 10% of it at the end of the run.

    The end is max_steps or, for a time-budgeted run (max_minutes), the budget: progress is
    whichever fraction is larger, so a run cut by time still ends on a low learning rate.
    """

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        if config.max_minutes and state is not None:
            progress = max(progress, state.train_seconds / (config.max_minutes * 60))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def budget_progress(config: DistillConfig, state: TrainState) -> float:
    """The fraction of the run's budget used before the coming step: steps done / max_steps or
    training seconds / max_minutes, whichever is larger (the run ends at whichever ends first).
    Both counters are restored on resume, so a step budget gives the same answer at the same
    step (what the warm-start policy switches on)."""
    used = state.step / config.max_steps if config.max_steps else 1.0
    if config.max_minutes:
        used = max(used, state.train_seconds / (config.max_minutes * 60))
    return min(used, 1.0)


def make_optimizer(trainable: list, config: DistillConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. PyTorch's fused kernel (one pass over each tensor
    instead of a dozen elementwise ops; the same update up to rounding) where it applies: a whole
    draft (sharding none) on CPU or CUDA. Measured on the demo's 2-layer draft (2-core AMD EPYC,
    bf16, side by side): 7 % shorter steps."""
    fused = config.sharding == "none" and all(p.device.type in ("cpu", "cuda") for p in trainable)
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                             fused=fused or None)


def example_lengths(examples: list) -> tuple[int, ...]:
    """Tokens per training example (prompt + completion where the data has one): what
    ``length_grouping`` sorts by."""
    return tuple(len(e.prompt_ids) + len(e.completion_ids or ()) for e in examples)


def next_examples(examples: list, state: TrainState, count: int, seed: int, rank: int, world: int,
                  lengths: tuple[int, ...] | None = None, group: int = 0):
    """The next ``count`` examples for this rank in a seeded per-epoch permutation.

    Deterministic from (seed, examples_seen): a resumed run continues with the same data. With
    ``lengths`` and ``group`` > 1 (``length_grouping``), each run of ``group`` global batches of
    that stream (``count * world`` examples each) is sorted by length, cut into batches again
    and those are taken in a seeded random order: a batch pads to its longest row, so rows of
    similar length pad less, while the examples drawn stay exactly those of the plain stream.
    """
    unit = count * world
    chosen = []
    for offset in range(count):
        position = state.examples_seen + rank * count + offset
        if lengths is not None and group > 1:
            block, within = divmod(position, unit * group)
            index = _length_sorted_block(lengths, seed, unit, group, block)[within]
        else:
            index = _stream_index(position, len(examples), seed)
        chosen.append(examples[index])
    state.examples_seen += unit
    return chosen


@functools.lru_cache(maxsize=4)
def _epoch_order(size: int, seed: int) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def _stream_index(position: int, size: int, seed: int) -> int:
    """The example at a position of the plain stream: epoch e is permutation (seed + e)."""
    epoch, within = divmod(position, size)
    return _epoch_order(size, seed + epoch)[within]


@functools.lru_cache(maxsize=4)
def _length_sorted_block(lengths: tuple[int, ...], seed: int, unit: int, group: int,
                         block: int) -> list[int]:
    """Stream positions [block * unit * group, (block + 1) * unit * group) sorted by length
    (stably), cut into ``group`` batches of ``unit`` and put in a seeded random batch order."""
    size = unit * group
    indices = [_stream_index(p, len(lengths), seed) for p in range(block * size, (block + 1) * size)]
    indices.sort(key=lengths.__getitem__)
    generator = torch.Generator().manual_seed((seed + 1) * 1_000_003 + block)
    batches = torch.randperm(group, generator=generator).tolist()
    return [i for b in batches for i in indices[b * unit : (b + 1) * unit]]


def open_folders(config: DistillConfig):
    """The main process claims the folder (and may clear it); the others follow."""
    from accelerate import PartialState

    state = PartialState(cpu=config.runtime.device == "cpu")
    if state.is_main_process:
        folder, resume_from = open_run_folder(config)
        ranks = [f"rank-{i}.json" for i in range(state.num_processes)]
        folder.track(*RUN_ENTRIES, *ranks)
    state.wait_for_everyone()
    if not state.is_main_process:
        folder, resume_from = open_run_folder(config, main_process=False)
    return folder, resume_from


def target_outputs(config, folder, accelerator, target, tokenizer, examples, state):
    """The target's completions, generated once by rank 0 (reported, not in the training
    budget): every training prompt's for teacher_cache; for a :vocab=K head, the fixed data's own
    completions when there are some (a datagen file holds the target's outputs), else up to 256
    generated ones."""
    wants_vocab = split_vocab_option(config.draft_init)[1] is not None
    if not (config.teacher_cache or wants_vocab):
        return None
    fixed = [e for e in examples if e.completion_ids is not None]
    if not config.teacher_cache and config.policy == "fixed" and len(fixed) == len(examples):
        return {e.source: e.completion_ids for e in examples}
    name = "teacher-cache.jsonl" if config.teacher_cache else "vocab-sample.jsonl"
    examples = examples if config.teacher_cache else examples[:256]
    path = folder.child(name)
    return _main_first(accelerator, state, lambda: teacher_cache(
        target, tokenizer, examples, path, temperature=config.sample_temperature,
        max_new_tokens=config.max_new_tokens, eos_token_id=eos_token_ids(target, tokenizer),
        generator=torch.Generator(device=accelerator.device).manual_seed(config.seed)))


def cached_topk(config, folder, accelerator, target, policy, examples, pad_id, state, token_ids=None):
    """teacher_topk: the target's top-k on the fixed data, scored once, every rank a share of
    the shards (restricted to a pruned draft's ``token_ids``); the time is data time."""
    completions = policy.completions(examples)
    path = folder.child("teacher-topk.safetensors")
    if config.teacher_topk_dir:  # shared between runs: build names one file per fingerprint
        path = Path(config.teacher_topk_dir).expanduser()
        if accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
    start = time.perf_counter()
    cache = teacher_topk.build(target, examples, completions, config.teacher_topk, path,
                               pad_id=pad_id, token_ids=token_ids, ranks=accelerator)
    state.data_seconds += time.perf_counter() - start
    return cache


def _main_first(accelerator, state, make):
    """``make()`` on rank 0 first, which writes its cache (the time is data time: reported, not
    in the training budget), then on the other ranks, which find that cache. Rank 0 keeps what
    it made instead of reading it back."""
    made = None
    if accelerator.is_main_process:
        start = time.perf_counter()
        made = make()
        state.data_seconds += time.perf_counter() - start
    accelerator.wait_for_everyone()
    return made if accelerator.is_main_process else make()

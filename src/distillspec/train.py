"""The DistillSpec training loop, explicit and short, on ``accelerate``.

Per optimiser step: sample ``grad_accum`` micro-batches from the data policy (fixed, teacher,
on-policy draft or mixed), count their completion tokens across processes, then per micro-batch:
target forward under no_grad, draft forward (bf16 autocast where it helps), token-level divergence
summed over completion tokens and divided by the step's global token count (so batch 8 x accum 1
equals batch 1 x accum 8, and 2 processes equal 1), backward; then clip, step, schedule, log,
evaluate (alpha at T=0 and T=1, tau through the engine), checkpoint atomically.

Launch: ``distillspec distill --config recipe.yaml`` (one process), ``torchrun --nproc_per_node 2
-m distillspec distill ...`` (2 CPU processes, gloo DDP) or ``accelerate launch -m distillspec
distill ...`` on GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from distillspec import checkpoint
from distillspec.config import DistillConfig, to_dict
from distillspec.datasets import load_examples, split_examples
from distillspec.divergences import get_divergence, masked_sum
from distillspec.drafts import parse_layer_spec, truncate_layers
from distillspec.evaluate import SDEvaluator
from distillspec.loading import (
    check_same_vocabulary,
    cpu_has_native_bf16,
    eos_token_ids,
    load_model,
    pad_token_id,
)
from distillspec.policies import make_policy


@dataclasses.dataclass
class TrainState:
    """Everything besides weights and optimiser that a resumed run needs."""

    step: int = 0
    examples_seen: int = 0  # position in the (seeded, per-epoch shuffled) training order
    train_seconds: float = 0.0


# -- set-up --------------------------------------------------------------------------------------


def _use_bf16(config: DistillConfig, device: torch.device) -> bool:
    if config.bf16 != "auto":
        return config.bf16 == "on"
    return device.type == "cuda" or cpu_has_native_bf16()


def build_draft(config: DistillConfig, target, tokenizer, device):
    """The draft to train: the target's first N layers, or a pretrained model (same tokenizer)."""
    num_layers = parse_layer_spec(config.draft_init)
    if num_layers is not None:
        draft = truncate_layers(target, num_layers)
    else:
        draft, draft_tokenizer = load_model(config.draft_init, device=device, dtype="float32")
        check_same_vocabulary(tokenizer, draft_tokenizer)
    draft = draft.float().to(device)
    draft.get_input_embeddings().weight.requires_grad_(config.train_embeddings)
    draft.get_output_embeddings().weight.requires_grad_(config.train_lm_head)
    if draft.config.tie_word_embeddings and config.train_embeddings != config.train_lm_head:
        raise ValueError(
            "This draft ties its input embeddings and output head, so train_embeddings and "
            "train_lm_head must be equal. Set both to true or both to false."
        )
    return draft.train()


def load_data(config: DistillConfig, tokenizer):
    limits = dict(
        max_prompt_tokens=config.max_prompt_tokens,
        max_completion_tokens=config.max_completion_tokens,
    )
    if not config.data:
        raise ValueError("No training data: set data (a JSONL file, a .txt file or a folder).")
    examples = load_examples(config.data, tokenizer, **limits)
    if config.eval_data:
        return examples, load_examples(config.eval_data, tokenizer, **limits)
    return split_examples(examples, config.held_out, config.seed)


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


# -- data order ----------------------------------------------------------------------------------


def next_examples(examples: list, state: TrainState, count: int, seed: int, rank: int, world: int):
    """The next ``count`` examples for this rank in a seeded per-epoch permutation.

    Deterministic from (seed, examples_seen): a resumed run continues with the same data.
    """
    chosen = []
    for offset in range(count):
        index = state.examples_seen + rank * count + offset
        epoch, within = divmod(index, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch))
        chosen.append(examples[int(order[within])])
    state.examples_seen += count * world
    return chosen


# -- the step ------------------------------------------------------------------------------------


def scored_columns(loss_mask: torch.Tensor) -> int:
    """How many trailing columns hold every scored position (at least 1)."""
    scored = loss_mask.any(dim=0).nonzero()
    return loss_mask.shape[1] - int(scored[0]) if scored.numel() else 1


def train_step(
    accelerator,
    draft,
    target,
    batches,
    divergence,
    optimizer,
    scheduler,
    config: DistillConfig,
    use_bf16: bool,
    timings: dict,
) -> float:
    """One optimiser step over pre-sampled micro-batches; returns the step's token-mean loss."""
    local_tokens = torch.tensor(
        float(sum(b.num_loss_tokens for b in batches)), device=accelerator.device
    )
    global_tokens = float(accelerator.reduce(local_tokens, reduction="sum"))
    # DDP averages gradients over processes, so scale by world size / global tokens.
    scale = accelerator.num_processes / max(global_tokens, 1.0)
    loss_sum = 0.0
    for index, batch in enumerate(batches):
        batch = batch.to(accelerator.device)
        # Only columns that predict completion tokens need logits: skipping the prompt columns
        # saves most of the LM-head and divergence cost (the full-vocabulary part of a step).
        keep = scored_columns(batch.loss_mask)
        loss_mask = batch.loss_mask[:, batch.loss_mask.shape[1] - keep :]
        inputs = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=keep,
        )
        start = time.perf_counter()
        with torch.no_grad():
            target_logits = target(**inputs).logits
        timings["target_forward"] += time.perf_counter() - start
        start = time.perf_counter()
        sync = index == len(batches) - 1
        # Gradients are all-reduced once per step, on the last micro-batch.
        with accelerator.no_sync(draft) if not sync else contextlib.nullcontext():
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                draft_logits = draft(**inputs).logits
            summed = masked_sum(divergence(draft_logits, target_logits), loss_mask)
            accelerator.backward(summed * scale)
        loss_sum += float(summed.detach())
        timings["draft_forward_backward"] += time.perf_counter() - start
    if config.clip_grad_norm > 0:
        accelerator.clip_grad_norm_(draft.parameters(), config.clip_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total_loss = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum"))
    return total_loss / max(global_tokens, 1.0)


# -- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """Everything one distillation run holds, so helpers take one argument instead of twelve."""

    config: DistillConfig
    accelerator: Accelerator
    run_dir: Path
    target: Any
    draft: Any
    tokenizer: Any
    policy: Any
    divergence: Any
    optimizer: Any
    scheduler: Any
    generator: torch.Generator
    use_bf16: bool
    train_examples: list
    state: TrainState = dataclasses.field(default_factory=TrainState)
    evaluator: SDEvaluator | None = None
    logger: _Logger | None = None
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def resolved(self) -> dict[str, Any]:
        return to_dict(self.config)


def _setup(config: DistillConfig) -> tuple[_Run, list]:
    """Load models and data, build policy, divergence, optimiser and schedule."""
    accelerator = Accelerator(cpu=config.device == "cpu")
    torch.manual_seed(config.seed)
    use_bf16 = _use_bf16(config, accelerator.device)
    target, tokenizer = load_model(
        config.target, device=accelerator.device, dtype="bfloat16" if use_bf16 else "float32"
    )
    target.requires_grad_(False)
    draft = build_draft(config, target, tokenizer, accelerator.device)
    train_examples, eval_examples = load_data(config, tokenizer)
    policy = make_policy(
        config.policy,
        temperature=config.sample_temperature,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos_token_ids(target, tokenizer),
        mix=config.mix_fractions() if config.policy == "mixed" else None,
        seed=config.seed,
        pad_id=pad_token_id(tokenizer),
    )
    beta = {"beta": config.jsd_beta} if config.divergence == "jsd" else {}
    divergence = get_divergence(config.divergence, temperature=config.loss_temperature, **beta)
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device=accelerator.device)
    generator.manual_seed(config.seed + accelerator.process_index)
    state = TrainState()
    run = _Run(
        config,
        accelerator,
        Path(config.output_dir),
        target,
        draft,
        tokenizer,
        policy,
        divergence,
        optimizer,
        make_scheduler(optimizer, config, state),
        generator,
        use_bf16,
        train_examples,
        state,
    )
    return run, eval_examples


def _make_evaluator(run: _Run, eval_examples: list) -> SDEvaluator | None:
    if not run.accelerator.is_main_process:
        return None
    config = run.config
    return SDEvaluator(
        run.target,
        [e.prompt_ids for e in eval_examples[: config.eval_prompts]],
        max_new_tokens=config.eval_max_new_tokens,
        tau_prompts=config.eval_tau_prompts,
        gamma=config.eval_gamma,
        eos_token_id=eos_token_ids(run.target, run.tokenizer),
        seed=config.seed,
        pad_id=pad_token_id(run.tokenizer),
    )


def distill(config: DistillConfig) -> dict[str, Any]:
    """Run (or resume) a DistillSpec recipe; returns the final evaluation metrics."""
    run, eval_examples = _setup(config)
    resumed_from = checkpoint.latest_checkpoint(run.run_dir) if config.resume else None
    if resumed_from is not None:
        _restore(run, resumed_from)
    run.draft, run.optimizer = run.accelerator.prepare(run.draft, run.optimizer)
    run.evaluator = _make_evaluator(run, eval_examples)
    run.logger = _Logger(run.run_dir, run.accelerator.is_main_process)
    if run.accelerator.is_main_process:
        checkpoint.atomic_write_text(
            run.run_dir / "distill_config.json", json.dumps(run.resolved, indent=2)
        )
    _evaluate(run, "resume" if resumed_from else "start")
    progress = _progress_bar(run)
    while run.state.step < config.max_steps:
        if config.max_minutes and run.state.train_seconds >= config.max_minutes * 60:
            break
        loss = _one_step(run)
        final = run.state.step >= config.max_steps
        if config.eval_every and run.state.step % config.eval_every == 0 and not final:
            _evaluate(run, "periodic")
        _advance(progress, run, loss)
        if config.save_every and run.state.step % config.save_every == 0 and not final:
            _save(run)
    progress.close()
    _evaluate(run, "final")
    _save(run)
    _finish(run)
    return run.last_eval


def _progress_bar(run: _Run) -> tqdm:
    """Counts steps, or seconds of training when the run has a time budget."""
    config = run.config
    timed = bool(config.max_minutes)
    return tqdm(
        total=round(config.max_minutes * 60) if timed else config.max_steps,
        initial=round(run.state.train_seconds) if timed else run.state.step,
        unit="s" if timed else "step",
        desc="distill",
        disable=not run.accelerator.is_main_process,
        dynamic_ncols=True,
    )


def _advance(progress: tqdm, run: _Run, loss: float) -> None:
    if run.config.max_minutes:
        progress.update(min(round(run.state.train_seconds), progress.total) - progress.n)
    else:
        progress.update(1)
    alpha = run.last_eval.get("alpha_t0", float("nan"))
    progress.set_postfix(step=run.state.step, loss=f"{loss:.3f}", alpha_t0=f"{alpha:.3f}")


def _one_step(run: _Run) -> float:
    """Sample the step's micro-batches, train on them, log; returns the loss."""
    config, accelerator, state = run.config, run.accelerator, run.state
    step_start = time.perf_counter()
    timings = {"generation": 0.0, "target_forward": 0.0, "draft_forward_backward": 0.0}
    unwrapped = accelerator.unwrap_model(run.draft)
    batches = []
    for _ in range(config.grad_accum):
        chosen = next_examples(
            run.train_examples,
            state,
            config.batch_size,
            config.seed,
            accelerator.process_index,
            accelerator.num_processes,
        )
        start = time.perf_counter()
        batches.append(
            run.policy.sample_batch(
                chosen, target=run.target, draft=unwrapped, generator=run.generator
            )
        )
        timings["generation"] += time.perf_counter() - start
    loss = train_step(
        accelerator,
        run.draft,
        run.target,
        batches,
        run.divergence,
        run.optimizer,
        run.scheduler,
        config,
        run.use_bf16,
        timings,
    )
    state.step += 1
    state.train_seconds += time.perf_counter() - step_start
    run.logger.log(
        {
            "step": state.step,
            "loss": loss,
            "lr": run.scheduler.get_last_lr()[0],
            "tokens": sum(b.num_loss_tokens for b in batches),
            "step_seconds": time.perf_counter() - step_start,
            "train_seconds": state.train_seconds,
            "policy": getattr(run.policy, "last_choice", None) or run.policy.name,
            **{f"time_{k}": v for k, v in timings.items()},
        }
    )
    return loss


# -- helpers -------------------------------------------------------------------------------------


def _evaluate(run: _Run, kind: str) -> None:
    if run.evaluator is not None:
        start = time.perf_counter()
        run.last_eval = run.evaluator.evaluate(run.accelerator.unwrap_model(run.draft))
        run.logger.log(
            {
                "step": run.state.step,
                "eval": kind,
                **run.last_eval,
                "train_seconds": run.state.train_seconds,
                "eval_seconds": time.perf_counter() - start,
            }
        )
    run.accelerator.wait_for_everyone()


def _rng_state(run: _Run) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "generator": run.generator.get_state(),
        "python": list(random.getstate()[1]),
    }
    if hasattr(run.policy, "state_dict"):
        state["policy"] = run.policy.state_dict()
    return state


def _save(run: _Run) -> None:
    """Rank 0 writes the checkpoint; every rank's RNG state goes in (per-rank entries)."""
    rank_states = _gather_objects(run.accelerator, _rng_state(run))
    if run.accelerator.is_main_process:
        trainer_state = {
            "train": dataclasses.asdict(run.state),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": rank_states,
        }
        checkpoint.save_checkpoint(
            run.run_dir,
            run.state.step,
            run.accelerator.unwrap_model(run.draft),
            run.tokenizer,
            run.resolved,
            model_card(run.config, run.last_eval, run.state),
            trainer_state,
            run.config.keep_checkpoints,
        )
    run.accelerator.wait_for_everyone()


def _gather_objects(accelerator, obj) -> list:
    if accelerator.num_processes == 1:
        return [obj]
    gathered: list = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _restore(run: _Run, folder: Path) -> None:
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard, device=str(run.accelerator.device)))
    missing, unexpected = run.draft.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ValueError(
            f"Checkpoint {folder} does not match the draft: missing {missing}, "
            f"unexpected {unexpected}. Resume with the same draft_init."
        )
    if run.draft.config.tie_word_embeddings:
        run.draft.tie_weights()
    saved = checkpoint.load_trainer_state(folder)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    for key, value in saved["train"].items():
        setattr(run.state, key, value)
    rank_rng = saved["rng"][min(run.accelerator.process_index, len(saved["rng"]) - 1)]
    torch.set_rng_state(rank_rng["torch"])
    run.generator.set_state(rank_rng["generator"])
    random.setstate((3, tuple(rank_rng["python"]), None))
    if "policy" in rank_rng and hasattr(run.policy, "load_state_dict"):
        run.policy.load_state_dict(rank_rng["policy"])


def model_card(config: DistillConfig, metrics: dict[str, float], state: TrainState) -> str:
    measured = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) or "| (not measured) | |"
    return f"""---
library_name: transformers
tags: [distillspec, speculative-decoding, draft-model]
---
# DistillSpec draft for `{config.target}`

A draft model for speculative decoding, distilled from the target's logits with distillspec.
Use it as `assistant_model=` in `transformers` generate, or with `distillspec generate --draft`.

## Recipe
- target: `{config.target}`; draft initialisation: `{config.draft_init}`
- divergence: `{config.divergence}`{f" (beta={config.jsd_beta})" if config.divergence == "jsd" else ""}; data policy: `{config.policy}`{f" ({config.mix})" if config.policy == "mixed" else ""}
- data: `{config.data}`; steps: {state.step}; batch {config.batch_size} x accumulation {config.grad_accum}; lr {config.lr}
- training time: {state.train_seconds / 60:.1f} min

## Measured on held-out prompts (target-generated continuations)
| metric | value |
|---|---|
{measured}

alpha_tT = mean of sum min(p, q) at temperature T; tau = tokens per target call of greedy SD with
gamma={config.eval_gamma}. The full recipe is in `distill_config.yaml`.
"""


def _finish(run: _Run) -> None:
    accelerator = run.accelerator
    draft = accelerator.unwrap_model(run.draft)
    if accelerator.is_main_process:
        checkpoint.save_model_folder(
            run.run_dir / "final",
            draft,
            run.tokenizer,
            run.resolved,
            model_card(run.config, run.last_eval, run.state),
        )
    checksum = sum(float(p.detach().double().sum()) for p in draft.parameters())
    summary = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "step": run.state.step,
        "examples_seen": run.state.examples_seen,
        "parameter_checksum": checksum,
        "metrics": run.last_eval,
    }
    checkpoint.atomic_write_text(
        run.run_dir / f"rank-{accelerator.process_index}.json", json.dumps(summary, indent=2)
    )
    accelerator.wait_for_everyone()


class _Logger:
    """metrics.jsonl (append, rank 0) and TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

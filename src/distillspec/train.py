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
from distillspec.loading import check_same_vocabulary, cpu_has_native_bf16, load_model
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


def make_scheduler(optimizer, config: DistillConfig):
    """Linear warm-up to the peak lr, then cosine decay to 10% of it at max_steps."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _eos_ids(target, tokenizer) -> list[int]:
    ids = target.generation_config.eos_token_id if target.generation_config else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


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
        inputs = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
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
            summed = masked_sum(divergence(draft_logits, target_logits), batch.loss_mask)
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


def distill(config: DistillConfig) -> dict[str, Any]:
    """Run (or resume) a DistillSpec recipe; returns the final evaluation metrics."""
    accelerator = Accelerator(cpu=config.device == "cpu")
    device = accelerator.device
    run_dir = Path(config.output_dir)
    torch.manual_seed(config.seed)
    use_bf16 = _use_bf16(config, device)
    target, tokenizer = load_model(
        config.target, device=device, dtype="bfloat16" if use_bf16 else "float32"
    )
    target.requires_grad_(False)
    draft = build_draft(config, target, tokenizer, device)
    train_examples, eval_examples = load_data(config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = _eos_ids(target, tokenizer)
    policy = make_policy(
        config.policy,
        temperature=config.sample_temperature,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos,
        mix=config.mix_fractions() if config.policy == "mixed" else None,
        seed=config.seed,
        pad_id=pad_id,
    )
    divergence = get_divergence(
        config.divergence,
        temperature=config.loss_temperature,
        **({"beta": config.jsd_beta} if config.divergence == "jsd" else {}),
    )
    optimizer = torch.optim.AdamW(
        [p for p in draft.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    scheduler = make_scheduler(optimizer, config)
    state = TrainState()
    generator = torch.Generator(device=device).manual_seed(config.seed + accelerator.process_index)
    resumed_from = checkpoint.latest_checkpoint(run_dir) if config.resume else None
    if resumed_from is not None:
        _restore(resumed_from, draft, optimizer, scheduler, state, policy, generator, accelerator)
    draft, optimizer = accelerator.prepare(draft, optimizer)
    evaluator = None
    if accelerator.is_main_process:
        evaluator = SDEvaluator(
            target,
            [e.prompt_ids for e in eval_examples[: config.eval_prompts]],
            max_new_tokens=config.eval_max_new_tokens,
            tau_prompts=config.eval_tau_prompts,
            gamma=config.eval_gamma,
            eos_token_id=eos,
            seed=config.seed,
            pad_id=pad_id,
        )
    logger = _Logger(run_dir, accelerator.is_main_process)
    resolved = to_dict(config)
    if accelerator.is_main_process:
        checkpoint.atomic_write_text(
            run_dir / "distill_config.json", json.dumps(resolved, indent=2)
        )
    last_eval = _evaluate(
        evaluator, accelerator, draft, state, logger, "start" if not resumed_from else "resume"
    )
    progress = tqdm(
        total=config.max_steps,
        initial=state.step,
        desc="distill",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    while state.step < config.max_steps:
        if config.max_minutes and state.train_seconds >= config.max_minutes * 60:
            break
        step_start = time.perf_counter()
        timings = {"generation": 0.0, "target_forward": 0.0, "draft_forward_backward": 0.0}
        unwrapped = accelerator.unwrap_model(draft)
        batches = []
        for _ in range(config.grad_accum):
            chosen = next_examples(
                train_examples,
                state,
                config.batch_size,
                config.seed,
                accelerator.process_index,
                accelerator.num_processes,
            )
            start = time.perf_counter()
            batches.append(
                policy.sample_batch(chosen, target=target, draft=unwrapped, generator=generator)
            )
            timings["generation"] += time.perf_counter() - start
        loss = train_step(
            accelerator,
            draft,
            target,
            batches,
            divergence,
            optimizer,
            scheduler,
            config,
            use_bf16,
            timings,
        )
        state.step += 1
        state.train_seconds += time.perf_counter() - step_start
        tokens = sum(b.num_loss_tokens for b in batches)
        logger.log(
            {
                "step": state.step,
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens": tokens,
                "step_seconds": time.perf_counter() - step_start,
                "policy": getattr(policy, "last_choice", None) or policy.name,
                **{f"time_{k}": v for k, v in timings.items()},
            }
        )
        final = state.step >= config.max_steps
        if config.eval_every and state.step % config.eval_every == 0 and not final:
            last_eval = _evaluate(evaluator, accelerator, draft, state, logger, "periodic")
        progress.update(1)
        progress.set_postfix(
            loss=f"{loss:.3f}", alpha=f"{last_eval.get('alpha_t0', float('nan')):.3f}"
        )
        if config.save_every and state.step % config.save_every == 0 and not final:
            _save(
                accelerator,
                run_dir,
                draft,
                tokenizer,
                resolved,
                last_eval,
                optimizer,
                scheduler,
                state,
                policy,
                generator,
                config,
            )
    progress.close()
    last_eval = _evaluate(evaluator, accelerator, draft, state, logger, "final")
    _save(
        accelerator,
        run_dir,
        draft,
        tokenizer,
        resolved,
        last_eval,
        optimizer,
        scheduler,
        state,
        policy,
        generator,
        config,
    )
    _finish(accelerator, run_dir, draft, tokenizer, resolved, last_eval, state, config)
    return last_eval


# -- helpers -------------------------------------------------------------------------------------


def _evaluate(evaluator, accelerator, draft, state, logger, kind) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if evaluator is not None:
        start = time.perf_counter()
        metrics = evaluator.evaluate(accelerator.unwrap_model(draft))
        logger.log(
            {
                "step": state.step,
                "eval": kind,
                **metrics,
                "eval_seconds": time.perf_counter() - start,
            }
        )
    accelerator.wait_for_everyone()
    return metrics


def _rng_state(generator, policy) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": list(random.getstate()[1]),
    }
    if hasattr(policy, "state_dict"):
        state["policy"] = policy.state_dict()
    return state


def _save(
    accelerator,
    run_dir,
    draft,
    tokenizer,
    resolved,
    metrics,
    optimizer,
    scheduler,
    state,
    policy,
    generator,
    config,
) -> None:
    """Rank 0 writes the checkpoint; every rank's RNG state goes in (per-rank entries)."""
    rank_states = _gather_objects(accelerator, _rng_state(generator, policy))
    if accelerator.is_main_process:
        trainer_state = {
            "train": dataclasses.asdict(state),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rank_states,
        }
        checkpoint.save_checkpoint(
            run_dir,
            state.step,
            accelerator.unwrap_model(draft),
            tokenizer,
            resolved,
            model_card(config, metrics, state),
            trainer_state,
            config.keep_checkpoints,
        )
    accelerator.wait_for_everyone()


def _gather_objects(accelerator, obj) -> list:
    if accelerator.num_processes == 1:
        return [obj]
    gathered: list = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _restore(folder, draft, optimizer, scheduler, state, policy, generator, accelerator) -> None:
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard, device=str(accelerator.device)))
    missing, unexpected = draft.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ValueError(
            f"Checkpoint {folder} does not match the draft: missing {missing}, "
            f"unexpected {unexpected}. Resume with the same draft_init."
        )
    if draft.config.tie_word_embeddings:
        draft.tie_weights()
    saved = checkpoint.load_trainer_state(folder)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    for key, value in saved["train"].items():
        setattr(state, key, value)
    rank_rng = saved["rng"][min(accelerator.process_index, len(saved["rng"]) - 1)]
    torch.set_rng_state(rank_rng["torch"])
    generator.set_state(rank_rng["generator"])
    random.setstate((3, tuple(rank_rng["python"]), None))
    if "policy" in rank_rng and hasattr(policy, "load_state_dict"):
        policy.load_state_dict(rank_rng["policy"])


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


def _finish(accelerator, run_dir, draft, tokenizer, resolved, metrics, state, config) -> None:
    if accelerator.is_main_process:
        checkpoint.save_model_folder(
            run_dir / "final",
            accelerator.unwrap_model(draft),
            tokenizer,
            resolved,
            model_card(config, metrics, state),
        )
    checksum = sum(
        float(p.detach().double().sum()) for p in accelerator.unwrap_model(draft).parameters()
    )
    summary = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "step": state.step,
        "examples_seen": state.examples_seen,
        "parameter_checksum": checksum,
        "metrics": metrics,
    }
    checkpoint.atomic_write_text(
        run_dir / f"rank-{accelerator.process_index}.json", json.dumps(summary, indent=2)
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

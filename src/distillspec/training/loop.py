"""The DistillSpec training loop, explicit and short, on ``accelerate``.

Per optimiser step: sample ``grad_accum`` micro-batches from the data policy (fixed, teacher,
on-policy draft or mixed), count their completion tokens across processes, then per micro-batch:
target forward under no_grad, draft forward (bf16 autocast where it is native), token-level
divergence summed over completion tokens and divided by the step's global token count (so batch
8 x accum 1 equals batch 1 x accum 8, and 2 processes equal 1), backward; then clip, step,
schedule, log (metrics.jsonl + accelerate's trackers), evaluate (alpha at T=0 and T=1, tau
through the engine) and checkpoint atomically. Ctrl-C finishes the current step, saves a
checkpoint and raises ``TrainingInterrupted``.

Launch: ``distillspec distill --config recipe.yaml`` (one process), ``torchrun --nproc_per_node 2
-m distillspec distill ...`` (2 CPU processes, gloo DDP) or ``accelerate launch -m distillspec
distill ...`` on GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from distillspec.common.config import flatten, to_dict
from distillspec.common.interrupt import interruptible
from distillspec.common.io import atomic_write_json
from distillspec.common.rundir import RunFolder
from distillspec.common.runtime import apply_threads, autocast_bf16
from distillspec.models.loading import eos_token_ids, pad_token_id
from distillspec.models.pruned_head import restricted_logits
from distillspec.training import checkpoint, setup, sharding
from distillspec.training.config import DistillConfig
from distillspec.training.divergences import get_divergence
from distillspec.training.evaluate import SDEvaluator
from distillspec.training.policies import cached_component, make_policy
from distillspec.training.setup import TrainState
from distillspec.training.step import Optimisation

_SAMPLES_DRAFT = ("draft", "mixed", "warm")  # policies that may sample from the draft


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the current step finished and a checkpoint was written; the message says how
    to resume."""


@dataclasses.dataclass
class _Run:
    """One distillation run, so helpers take one argument instead of twelve."""

    config: DistillConfig
    folder: RunFolder
    opt: Optimisation
    tokenizer: Any
    policy: Any
    generator: torch.Generator
    train_examples: list
    evaluator: SDEvaluator | None
    state: TrainState
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    saved_step: int = -1  # the step of the newest checkpoint on disk (loaded or written)
    replica: sharding.Replica | None = None  # the whole draft, under sharding fsdp
    train_lengths: tuple[int, ...] | None = None  # per example, for length_grouping

    @property
    def accelerator(self) -> Accelerator:
        return self.opt.accelerator

    def whole_draft(self) -> torch.nn.Module:
        """The whole draft, for generation, evaluation and saving. Under sharding it is the
        replica refreshed from the shards, a collective: every process calls this at the same
        points, before any rank-0-only use."""
        if self.replica is not None:
            return self.replica.refresh(self.opt.draft, self.state.step)
        return self.accelerator.unwrap_model(self.opt.draft)

    def log(self, record: dict[str, Any]) -> None:
        """metrics.jsonl (rank 0) and accelerate's trackers."""
        if self.accelerator.is_main_process:
            with self.folder.child("metrics.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(numbers, step=record["step"])


def _build(config: DistillConfig, folder: RunFolder, resume_from, target=None, tokenizer=None,
           evaluator: SDEvaluator | None = None) -> _Run:
    """Load models (unless given) and data, build policy, loss, optimiser and schedule (and
    restore them)."""
    accelerator = Accelerator(
        cpu=config.runtime.device == "cpu",
        log_with=config.log_with or None,
        project_dir=str(folder.child("trackers")) if config.log_with else None,
    )
    torch.manual_seed(config.seed)
    use_bf16 = autocast_bf16(config.bf16, accelerator.device)
    target, tokenizer = setup.run_target(config, accelerator.device, target, tokenizer)
    target.requires_grad_(False)
    train_examples, eval_examples = setup.load_data(config, tokenizer)
    eos, pad_id = eos_token_ids(target, tokenizer), pad_token_id(tokenizer)
    state = TrainState()
    cached = setup.target_outputs(config, folder, accelerator, target, tokenizer, train_examples, state)
    vocabulary = setup.draft_vocabulary(config, (cached or {}).values(), eos,
                                        target.get_input_embeddings().weight.shape[0])
    draft = setup.trainable_draft(config, target, tokenizer, vocabulary)
    head_ids = getattr(draft.get_output_embeddings(), "token_ids", None)  # a pruned head's
    if resume_from is not None:  # whole weights, before any sharding
        checkpoint.load_weights(resume_from, draft, accelerator.device)
    replica = sharding.Replica(draft) if config.sharding == "fsdp" else None
    if replica is not None:
        sharding.shard(draft)  # before the optimiser: its parameters become shards
    policy = _data_policy(config, cached if config.teacher_cache else None, eos, pad_id, state)
    replayed = cached_component(policy)  # the part whose fixed completions have a top-k cache
    if config.teacher_topk and replayed is not None:
        replayed.topk = setup.cached_topk(config, folder, accelerator, target, replayed,
                                          train_examples, pad_id, state, token_ids=vocabulary)
    divergence = get_divergence(config.divergence, **config.divergence_options())
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer = setup.make_optimizer(trainable, config)
    scheduler = setup.make_scheduler(optimizer, config, state)
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + accelerator.process_index)
    if resume_from is not None:
        _restore(resume_from, draft, optimizer, scheduler, replica, state, generator, policy,
                 accelerator.process_index)
    if replica is None:  # FSDP already spreads the draft; DDP would wrap it a second time
        draft, optimizer = accelerator.prepare(draft, optimizer)
    if not accelerator.is_main_process:
        evaluator = None
    elif evaluator is None:
        evaluator = setup.make_evaluator(config, target, tokenizer, eval_examples)
    reference = setup.filter_reference(config, target, tokenizer, vocabulary)
    if config.target_sharding == "fsdp":  # last: everything above ran the target whole
        _shard_target(target, head_ids)
    opt = Optimisation(accelerator, draft, target, divergence, optimizer, scheduler,
                       config.clip_grad_norm, use_bf16, filter_keep=config.filter_keep,
                       reference=reference, attention=config.train_attention)
    lengths = setup.example_lengths(train_examples) if config.length_grouping > 1 else None
    run = _Run(config, folder, opt, tokenizer, policy, generator, train_examples, evaluator, state,
               replica=replica, train_lengths=lengths)
    run.saved_step = state.step if resume_from is not None else -1
    return run


def _data_policy(config: DistillConfig, teacher_completions, eos, pad_id: int, state: TrainState):
    """Where each batch's completions come from (fixed data, the target, the draft, a mix)."""
    return make_policy(
        config.policy, temperature=config.sample_temperature, max_new_tokens=config.max_new_tokens,
        eos_token_id=eos, mix=config.mix_fractions() if config.policy == "mixed" else None,
        seed=config.seed, pad_id=pad_id, teacher_completions=teacher_completions,
        warm_fraction=config.warm_fraction if config.policy == "warm" else None,
        progress=lambda: setup.budget_progress(config, state),
    )


def _restore(resume_from, draft, optimizer, scheduler, replica, state, generator, policy,
             process_index: int) -> None:
    """Optimiser, schedule, counters, RNG and policy state of a checkpoint (whole either way)."""
    saved = checkpoint.load_trainer_state(resume_from)
    if replica is not None:
        sharding.load_full_optimizer_state(draft, optimizer, saved["optimizer"])
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    checkpoint.restore_state(saved, state, generator, policy, process_index)


def _shard_target(target, head_ids) -> None:
    """``target_sharding: fsdp``. A pruned draft is scored against the target's head restricted
    to its kept ids (``head_ids``); that head is built first, while the target is whole, and is
    then sharded with the rest of the target."""
    with restricted_logits(target, head_ids):
        pass
    sharding.shard_frozen(target)


def distill(config: DistillConfig, *, target=None, tokenizer=None,
            evaluator: SDEvaluator | None = None) -> dict[str, Any]:
    """Run (or resume) a DistillSpec recipe; returns the final evaluation metrics. A given
    ``target`` and ``tokenizer`` (from ``setup.load_target(config)``; left unchanged) replace
    loading ``config.target``: several runs in one process load it once. A given ``evaluator``
    (``setup.make_evaluator`` with that target, for a recipe with the same evaluation settings)
    replaces building one: the target's held-out continuations are then not generated again."""
    apply_threads(config.runtime)
    setup.check_evaluator(config, evaluator, target)
    if target is not None and config.target_sharding != "none":
        raise ValueError(
            "target_sharding fsdp shards the target in place, and a target passed to distill is "
            "left unchanged for the caller's other runs: let distill load it (pass no target), "
            "or use target_sharding none."
        )
    setup.check_inputs(config)
    folder, resume_from = setup.open_folders(config)
    if resume_from is not None:  # before anything loads
        checkpoint.check_same_trainables(resume_from, config)
    run = _build(config, folder, resume_from, target, tokenizer, evaluator)
    if run.accelerator.is_main_process:
        checkpoint.truncate_metrics(folder.child("metrics.jsonl"), run.state.step)
        atomic_write_json(folder.child("distill_config.json"), to_dict(config))
    if config.log_with:
        run.accelerator.init_trackers("distillspec", config={
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(to_dict(config)).items()})
    _evaluate(run, "resume" if resume_from else "start")
    progress = _progress_bar(run)
    with interruptible("stopping after this step and saving a checkpoint") as interrupted:
        while run.state.step < config.max_steps:
            if config.max_minutes and run.state.train_seconds >= config.max_minutes * 60:
                break
            loss = _one_step(run)
            final = run.state.step >= config.max_steps
            if config.eval_every and run.state.step % config.eval_every == 0 and not final:
                _evaluate(run, "periodic")
            _advance(progress, run, loss)
            if _agreed(run, interrupted.is_set()):
                progress.close()
                _save(run)
                raise TrainingInterrupted(
                    f"interrupted after step {run.state.step}; checkpoint saved in "
                    f"{folder.path / 'checkpoints'}. Resume with the same command plus --resume."
                )
            if config.save_every and run.state.step % config.save_every == 0 and not final:
                _save(run)
    progress.close()
    if run.state.step > 0 or not run.last_eval:  # max_steps 0: the start evaluation is final
        _evaluate(run, "final")
    _save(run)
    _finish(run)
    run.accelerator.end_training()
    return run.last_eval


def _agreed(run: _Run, local: bool) -> bool:
    """Whether any process was interrupted (all processes must stop at the same step)."""
    if run.accelerator.num_processes == 1:
        return local
    flag = torch.tensor(float(local), device=run.accelerator.device)
    return bool(run.accelerator.reduce(flag, reduction="sum") > 0)


def _progress_bar(run: _Run) -> tqdm:
    """Counts steps, or seconds of training when the run has a time budget."""
    config, timed = run.config, bool(run.config.max_minutes)
    return tqdm(
        total=round(config.max_minutes * 60) if timed else config.max_steps,
        initial=round(run.state.train_seconds) if timed else run.state.step,
        unit="s" if timed else "step", desc="distill", dynamic_ncols=True,
        disable=not run.accelerator.is_main_process,
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
    # The policy samples from the draft only in on-policy runs; a sharded draft is gathered
    # into its replica only then (every process takes this branch alike).
    draft = run.whole_draft() if config.policy in _SAMPLES_DRAFT or run.replica is None else None
    # Live teacher samples take a different number of target forwards on each process, so a
    # sharded target is gathered whole for them (every process alike; a no-op when whole).
    live_teacher = config.uses_teacher and not config.teacher_cache
    batches = []
    with sharding.gathered(run.opt.target) if live_teacher else contextlib.nullcontext():
        for _ in range(config.grad_accum):
            chosen = setup.next_examples(
                run.train_examples, state, config.batch_size, config.seed,
                accelerator.process_index, accelerator.num_processes,
                run.train_lengths, config.length_grouping,
            )
            batches.append(run.policy.sample_batch(chosen, target=run.opt.target, draft=draft,
                                                   generator=run.generator))
    generation = time.perf_counter() - step_start
    result = run.opt.step(batches)  # a sharded target's forwards run on every process together
    sharding.clear_forward_record(run.opt.target)
    state.step += 1
    state.train_seconds += time.perf_counter() - step_start
    run.log({
        "step": state.step, **result, "lr": run.opt.scheduler.get_last_lr()[0],
        "step_seconds": time.perf_counter() - step_start, "train_seconds": state.train_seconds,
        "data_seconds": state.data_seconds,
        "policy": getattr(run.policy, "last_choice", None) or run.policy.name,
        "time_generation": generation,
    })
    return result["loss"]


def _evaluate(run: _Run, kind: str) -> None:
    draft = run.whole_draft()  # every process: a collective under sharding
    # tau decodes through the target on rank 0 alone, so a sharded target is gathered whole
    # there for it (the other processes free their copy at once); alpha reuses the target
    # logits the evaluator computed before the target was sharded.
    tau = run.config.eval_tau_prompts > 0
    whole_target = sharding.gathered(run.opt.target, keep=run.evaluator is not None)
    with whole_target if tau else contextlib.nullcontext():
        if run.evaluator is not None:
            start = time.perf_counter()
            run.last_eval = run.evaluator.evaluate(draft)
            run.log({"step": run.state.step, "eval": kind, **run.last_eval,
                     "train_seconds": run.state.train_seconds,
                     "eval_seconds": time.perf_counter() - start})
    run.accelerator.wait_for_everyone()


def _card(run: _Run) -> str:
    return checkpoint.model_card(run.config, run.last_eval, run.state.step, run.state.train_seconds)


def _save(run: _Run) -> None:
    """Rank 0 writes the checkpoint; every rank's RNG state goes in (per-rank entries)."""
    if run.state.step == run.saved_step:  # e.g. resumed at the last step: nothing new to save
        return
    run.saved_step = run.state.step
    rank_states = _gather_objects(run.accelerator, checkpoint.rng_state(run.generator, run.policy))
    draft = run.whole_draft()
    optimizer_state = (sharding.full_optimizer_state(run.opt.draft, run.opt.optimizer)
                       if run.replica is not None else run.opt.optimizer.state_dict())
    if run.accelerator.is_main_process:
        trainer_state = {
            "train": dataclasses.asdict(run.state),
            "optimizer": optimizer_state,
            "scheduler": run.opt.scheduler.state_dict(),
            "rng": rank_states,
        }
        checkpoint.save_checkpoint(
            run.folder.child("checkpoints"), run.state.step, draft,
            run.tokenizer, to_dict(run.config), _card(run), trainer_state,
            run.config.keep_checkpoints,
        )
    run.accelerator.wait_for_everyone()


def _gather_objects(accelerator, obj) -> list:
    if accelerator.num_processes == 1:
        return [obj]
    gathered: list = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _finish(run: _Run) -> None:
    accelerator, draft = run.accelerator, run.whole_draft()
    if accelerator.is_main_process:
        checkpoint.save_model_folder(run.folder.child("final"), draft, run.tokenizer,
                                     to_dict(run.config), _card(run), metrics=run.last_eval)
    checksum = sum(float(p.detach().double().sum()) for p in draft.parameters())
    summary = {
        "rank": accelerator.process_index, "world_size": accelerator.num_processes,
        "step": run.state.step, "examples_seen": run.state.examples_seen,
        "parameter_checksum": checksum, "metrics": run.last_eval,
        # What this process holds of the trainable weights (all of them unless sharded).
        "trainable_held": sharding.held_numel(run.opt.draft),
        # ... and of the target's weights (all of them unless target_sharding shards it).
        "target_held": sharding.held_numel(run.opt.target, trainable=False),
    }
    name = f"rank-{accelerator.process_index}.json"
    atomic_write_json(run.folder.child(name), summary)
    accelerator.wait_for_everyone()

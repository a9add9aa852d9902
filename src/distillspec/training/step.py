"""One optimiser step of DistillSpec: token-normalised divergence over micro-batches.

The loss of a step is sum over completion tokens of D(p || q) divided by the step's *global*
completion-token count (all micro-batches, all processes), so batch 8 x accumulation 1 equals
batch 1 x accumulation 8 and 2 processes equal 1. The target runs under no_grad; only columns
that predict completion tokens get logits. A pruned-vocabulary draft is compared with the
target's distribution restricted (renormalised) to its K kept ids.

Token filter (AdaSPEC; ``reference`` and ``filter_keep`` < 1): a frozen reference draft is
scored with the same divergence, and each micro-batch keeps only the ``ceil(filter_keep * n)``
of its n tokens with the largest gap draft - reference (``divergences.filter_tokens``); the
count then means kept tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch
from accelerate import Accelerator

from distillspec.models.pruned_head import kept_logits_only, restricted_logits
from distillspec.training.divergences import (
    filter_tokens,
    kept_token_count,
    masked_sum,
    sparse_divergence,
)

# Up to this many columns, eager attention (matmul, softmax, matmul) beats the fused SDPA kernel
# on CPU for a training forward and backward: measured on the demo's 2-layer draft (2-core AMD
# EPYC, bf16 autocast, batch 8), steps 2-4 % shorter at 128-256 columns with the full head and
# 13 % on the demo's length-grouped batches, but 26 % longer at 512 columns and 95 % at 1024.
CPU_EAGER_MAX_COLUMNS = 256


def training_attention(choice: str, config, device: torch.device, columns: int) -> str:
    """The attention implementation for one training micro-batch: ``choice`` unless it is
    auto, which picks eager on CPU for batches up to CPU_EAGER_MAX_COLUMNS columns and the
    model's own implementation everywhere else."""
    if choice != "auto":
        return choice
    if device.type == "cpu" and columns <= CPU_EAGER_MAX_COLUMNS:
        return "eager"
    return config._attn_implementation


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """Run the model's forwards with attention ``name`` (its config's switch, read by every
    attention layer at each forward), restoring the previous one after."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@dataclasses.dataclass
class Optimisation:
    """The parts of one optimiser step: models, loss, optimiser, schedule (and the optional
    reference draft of the token filter, frozen, on the draft's device)."""

    accelerator: Accelerator
    draft: torch.nn.Module
    target: torch.nn.Module
    divergence: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    clip_grad_norm: float = 1.0
    use_bf16: bool = False
    reference: torch.nn.Module | None = None
    filter_keep: float = 1.0
    attention: str = "auto"

    def __post_init__(self) -> None:
        kept_token_count(0, self.filter_keep)  # validates the fraction
        if self.filter_keep < 1.0 and self.reference is None:
            raise ValueError(
                f"filter_keep {self.filter_keep} drops tokens judged by a reference draft, but no "
                "reference model was given. Pass one, or use filter_keep 1.0 (no filtering)."
            )

    @property
    def filtering(self) -> bool:
        return self.reference is not None and self.filter_keep < 1.0

    def _loss_tokens(self, batch) -> int:
        """The tokens this micro-batch's loss sums over: all its completion tokens, or the
        ``kept_token_count`` the filter keeps of them (a number known before any forward)."""
        scored = batch.num_loss_tokens
        return kept_token_count(scored, self.filter_keep) if self.filtering else scored

    def step(self, batches: list) -> dict[str, float]:
        """One optimiser step over pre-sampled micro-batches: the token-mean loss and timings."""
        accelerator = self.accelerator
        # The filter keeps exactly ceil(keep * n) of a micro-batch's n tokens, so the global
        # count of kept tokens is known now, before the forwards: the loss is normalised by the
        # tokens it really sums over, with no extra pass to choose them first.
        local = torch.tensor([float(sum(b.num_loss_tokens for b in batches)),
                              float(sum(self._loss_tokens(b) for b in batches))],
                             device=accelerator.device)
        scored_tokens, global_tokens = accelerator.reduce(local, reduction="sum").tolist()
        # DDP averages gradients over processes, so scale by world size / global tokens.
        scale = accelerator.num_processes / max(global_tokens, 1.0)
        loss_sum, times = 0.0, {}
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1  # gradients are all-reduced once, on the last one
            loss, seconds = self._micro_batch(batch.to(accelerator.device), scale, last)
            loss_sum += loss
            times = {name: times.get(name, 0.0) + value for name, value in seconds.items()}
        if self.clip_grad_norm > 0:
            accelerator.clip_grad_norm_(self.draft.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum"))
        kept = {"tokens_kept": global_tokens} if self.filtering else {}
        return {"loss": total / max(global_tokens, 1.0), "tokens": scored_tokens, **kept, **times}

    def _micro_batch(self, batch, scale: float, last: bool) -> tuple[float, dict[str, float]]:
        """Target (and reference) forward, draft forward, divergence, backward; returns the
        summed loss and the seconds of each part.

        Only columns that predict completion tokens get logits: skipping the prompt columns
        saves most of the LM-head and divergence cost. A pruned draft is compared with the
        target restricted to its vocabulary (both heads then compute K columns only).
        """
        keep = batch.scored_columns()
        loss_mask = batch.loss_mask[:, batch.loss_mask.shape[1] - keep :]
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, logits_to_keep=keep)
        accelerator, times = self.accelerator, {}
        with kept_logits_only(accelerator.unwrap_model(self.draft)) as kept:
            start = time.perf_counter()
            loss_fn, loss_mask = self._loss_fn(batch, inputs, keep, kept, loss_mask)
            times["time_target_forward"] = time.perf_counter() - start
            if self.filtering:
                start = time.perf_counter()
                reference_per_token = self._reference_per_token(inputs, loss_fn, kept)
                times["time_reference_forward"] = time.perf_counter() - start
            start = time.perf_counter()
            draft_config = accelerator.unwrap_model(self.draft).config
            attention = training_attention(self.attention, draft_config, accelerator.device,
                                           batch.input_ids.shape[1])
            with contextlib.nullcontext() if last else accelerator.no_sync(self.draft), \
                    attention_implementation(draft_config, attention):
                with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=self.use_bf16):
                    draft_logits = self.draft(**inputs).logits
                draft_per_token = loss_fn(draft_logits)
                if self.filtering:
                    loss_mask = filter_tokens(draft_per_token, reference_per_token, loss_mask,
                                              self.filter_keep)
                summed = masked_sum(draft_per_token, loss_mask)
                accelerator.backward(summed * scale)
        times["time_draft_forward_backward"] = time.perf_counter() - start
        return float(summed.detach()), times

    def _loss_fn(self, batch, inputs: dict, keep: int, kept, loss_mask):
        """The micro-batch's per-token loss as a function of a draft's logits, and its mask:
        against the target's logits (forward under no_grad) or its cached top-k (no forward)."""
        if batch.topk_ids is not None:
            return self._sparse_loss(batch, keep, kept, loss_mask)
        with torch.no_grad(), restricted_logits(self.target, kept):
            target_logits = self.target(**inputs).logits
        return (lambda draft_logits: self.divergence(draft_logits, target_logits)), loss_mask

    @torch.no_grad()
    def _reference_per_token(self, inputs: dict, loss_fn, kept) -> torch.Tensor:
        """The reference draft's per-token divergence to the target (the same loss). For a
        pruned draft the reference was pruned to the same kept ids (``setup``)."""
        with kept_logits_only(self.reference) if kept is not None else contextlib.nullcontext():
            return loss_fn(self.reference(**inputs).logits)

    def _sparse_loss(self, batch, keep: int, kept, loss_mask):
        """The configured divergence against the cached top-k (``sparse_divergence``: fkl
        renormalised over the k ids, the others with a tail bucket); ids are mapped into a
        pruned head's space, and positions with no cached id inside it are not scored."""
        ids = batch.topk_ids[:, -keep:].long()
        log_probs = batch.topk_log_probs[:, -keep:].float()
        if kept is not None:
            lookup = torch.full((int(kept.max()) + 2,), -1, dtype=torch.long, device=ids.device)
            lookup[kept] = torch.arange(len(kept), device=ids.device)
            mapped = lookup[ids.clamp(0, len(lookup) - 1)]
            ids = torch.where(ids >= 0, mapped, ids)  # -1 (absent) and TAIL_ID stay as they are
        log_probs = log_probs.masked_fill(ids == -1, float("-inf"))
        loss_mask = loss_mask * (ids >= 0).any(dim=-1)
        divergence = sparse_divergence(self.divergence)
        return (lambda logits: divergence(logits, ids, log_probs)), loss_mask

"""One optimiser step of DistillSpec: token-normalised divergence over micro-batches.

The loss of a step is sum over completion tokens of D(p || q) divided by the step's *global*
completion-token count (all micro-batches, all processes), so batch 8 x accumulation 1 equals
batch 1 x accumulation 8 and 2 processes equal 1. The target runs under no_grad; only columns
that predict completion tokens get logits. A pruned-vocabulary draft is compared with the
target's distribution restricted (renormalised) to its K kept ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch
from accelerate import Accelerator

from distillspec.models.pruned_head import kept_logits_only, restricted_logits
from distillspec.training.divergences import masked_sum, sparse_forward_kl


@dataclasses.dataclass
class Optimisation:
    """The parts of one optimiser step: models, loss, optimiser, schedule."""

    accelerator: Accelerator
    draft: torch.nn.Module
    target: torch.nn.Module
    divergence: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    clip_grad_norm: float = 1.0
    use_bf16: bool = False

    def step(self, batches: list) -> dict[str, float]:
        """One optimiser step over pre-sampled micro-batches: the token-mean loss and timings."""
        accelerator = self.accelerator
        local = torch.tensor(float(sum(b.num_loss_tokens for b in batches)), device=accelerator.device)
        global_tokens = float(accelerator.reduce(local, reduction="sum"))
        # DDP averages gradients over processes, so scale by world size / global tokens.
        scale = accelerator.num_processes / max(global_tokens, 1.0)
        loss_sum, target_s, draft_s = 0.0, 0.0, 0.0
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1  # gradients are all-reduced once, on the last one
            loss, seconds = self._micro_batch(batch.to(accelerator.device), scale, last)
            loss_sum, target_s, draft_s = loss_sum + loss, target_s + seconds[0], draft_s + seconds[1]
        if self.clip_grad_norm > 0:
            accelerator.clip_grad_norm_(self.draft.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum"))
        return {
            "loss": total / max(global_tokens, 1.0),
            "tokens": global_tokens,
            "time_target_forward": target_s,
            "time_draft_forward_backward": draft_s,
        }

    def _micro_batch(self, batch, scale: float, last: bool) -> tuple[float, tuple[float, float]]:
        """Target forward, draft forward, divergence, backward; (summed loss, (t_target, t_draft)).

        Only columns that predict completion tokens get logits: skipping the prompt columns
        saves most of the LM-head and divergence cost. A pruned draft is compared with the
        target restricted to its vocabulary (both heads then compute K columns only).
        """
        keep = batch.scored_columns()
        loss_mask = batch.loss_mask[:, batch.loss_mask.shape[1] - keep :]
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, logits_to_keep=keep)
        accelerator = self.accelerator
        with kept_logits_only(accelerator.unwrap_model(self.draft)) as kept:
            start = time.perf_counter()
            if batch.topk_ids is None:
                with torch.no_grad(), restricted_logits(self.target, kept):
                    target_logits = self.target(**inputs).logits
                loss_fn = lambda draft_logits: self.divergence(draft_logits, target_logits)  # noqa: E731
            else:  # the target's cached top-k: no target forward at all
                loss_fn, loss_mask = self._sparse_loss(batch, keep, kept, loss_mask)
            middle = time.perf_counter()
            with contextlib.nullcontext() if last else accelerator.no_sync(self.draft):
                with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=self.use_bf16):
                    draft_logits = self.draft(**inputs).logits
                summed = masked_sum(loss_fn(draft_logits), loss_mask)
                accelerator.backward(summed * scale)
        end = time.perf_counter()
        return float(summed.detach()), (middle - start, end - middle)

    def _sparse_loss(self, batch, keep: int, kept, loss_mask):
        """sparse_forward_kl against the cached top-k (ids mapped into a pruned head's space;
        positions with no cached id inside the draft's vocabulary are not scored)."""
        ids = batch.topk_ids[:, -keep:].long()
        log_probs = batch.topk_log_probs[:, -keep:].float()
        if kept is not None:
            lookup = torch.full((int(kept.max()) + 2,), -1, dtype=torch.long, device=ids.device)
            lookup[kept] = torch.arange(len(kept), device=ids.device)
            ids = lookup[ids.clamp(max=len(lookup) - 1)]  # -1 (absent) hits the last entry: -1
        log_probs = log_probs.masked_fill(ids < 0, float("-inf"))
        loss_mask = loss_mask * (ids >= 0).any(dim=-1)
        temperature = getattr(self.divergence, "keywords", {}).get("temperature", 1.0)
        return (
            lambda logits: sparse_forward_kl(logits, ids, log_probs, temperature=temperature),
            loss_mask,
        )

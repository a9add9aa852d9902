"""One optimiser step of DistillSpec: token-normalised divergence over micro-batches.

The loss of a step is sum over completion tokens of D(p || q) divided by the step's *global*
completion-token count (all micro-batches, all processes), so batch 8 x accumulation 1 equals
batch 1 x accumulation 8 and 2 processes equal 1. The target runs under no_grad; only columns
that predict completion tokens get logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch
from accelerate import Accelerator

from distillspec.training.divergences import masked_sum


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
            batch = batch.to(accelerator.device)
            # Only columns that predict completion tokens need logits: skipping the prompt
            # columns saves most of the LM-head and divergence cost of a step.
            keep = batch.scored_columns()
            loss_mask = batch.loss_mask[:, batch.loss_mask.shape[1] - keep :]
            inputs = dict(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                logits_to_keep=keep,
            )
            start = time.perf_counter()
            with torch.no_grad():
                target_logits = self.target(**inputs).logits
            target_s += time.perf_counter() - start
            start = time.perf_counter()
            last = index == len(batches) - 1  # gradients are all-reduced once, on the last one
            with contextlib.nullcontext() if last else accelerator.no_sync(self.draft):
                with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=self.use_bf16):
                    draft_logits = self.draft(**inputs).logits
                summed = masked_sum(self.divergence(draft_logits, target_logits), loss_mask)
                accelerator.backward(summed * scale)
            loss_sum += float(summed.detach())
            draft_s += time.perf_counter() - start
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

"""One teacher-forced batch of prompts + completions, with masks built from lengths.

Masks come from prompt and completion *lengths*, never from token identity: pad == eos, several
stop ids, no eos and an EOS inside a completion all just work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    """Prompt + completion rows for one teacher-forced forward pass of draft and target.

    Row b is ``[pads, prompt_b, completion_b, pads]``: prompts left-padded to the longest prompt
    ``P`` so every completion starts at column ``P``, completions right-padded.
    ``loss_mask [B, L]`` is aligned with the *logits*: ``loss_mask[b, j] = 1`` iff token ``j + 1``
    is a completion token of row b, i.e. the logits at ``j`` predict it (the last column is
    always 0). ``position_ids`` count real tokens from 0 (0 at pads).
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long, 1 on prompt and completion tokens
    position_ids: torch.Tensor  # [B, L] long
    loss_mask: torch.Tensor  # [B, L] float32
    # The target's cached top-k at each logits column (teacher_topk), else None:
    topk_ids: torch.Tensor | None = None  # [B, L, k] int32, -1 where nothing is cached
    topk_log_probs: torch.Tensor | None = None  # [B, L, k] float16

    @property
    def num_loss_tokens(self) -> int:
        """Completion tokens scored in this batch (the real count, after generation)."""
        return int(self.loss_mask.sum().item())

    def scored_columns(self) -> int:
        """How many trailing columns hold every scored position (at least 1)."""
        scored = self.loss_mask.any(dim=0).nonzero()
        return self.loss_mask.shape[1] - int(scored[0]) if scored.numel() else 1

    def to(self, device: torch.device | str) -> SequenceBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SequenceBatch(*(move(getattr(self, f.name)) for f in dataclasses.fields(self)))


def build_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    topk: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> SequenceBatch:
    """Lay out prompts (left-padded) and completions (right-padded); masks from lengths only.

    ``pad_id`` only fills masked slots, so any id the models can embed works (even the EOS id).
    Rows with an empty completion get no loss tokens. ``topk`` (per row: the target's cached
    ids and log-probs for each completion token) is laid out on the same columns as the mask.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
    if not prompts:
        raise ValueError("Cannot build an empty batch: pass at least one example.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(
            "Every prompt needs at least one token: the first completion token is predicted "
            "from the prompt's last position. Add a BOS token or some text."
        )
    prompt_width = max(len(p) for p in prompts)
    width = prompt_width + max(len(c) for c in completions)
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    loss_mask = torch.zeros(batch, width, dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        start, end = prompt_width - len(prompt), prompt_width + len(completion)
        input_ids[row, start:end] = torch.tensor([*prompt, *completion], dtype=torch.long)
        attention_mask[row, start:end] = 1
        # Logits at column j predict token j + 1: completion tokens sit at [P, end).
        loss_mask[row, prompt_width - 1 : end - 1] = 1.0
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0) * attention_mask
    if topk is None:
        return SequenceBatch(input_ids, attention_mask, position_ids, loss_mask)
    k = topk[0][0].shape[-1]
    topk_ids = torch.full((batch, width, k), -1, dtype=torch.int32)
    topk_log_probs = torch.full((batch, width, k), float("-inf"), dtype=torch.float16)
    for row, ((ids, log_probs), completion) in enumerate(zip(topk, completions)):
        if len(ids) != len(completion):
            raise ValueError("the cached top-k does not match the completion it belongs to.")
        topk_ids[row, prompt_width - 1 : prompt_width - 1 + len(ids)] = ids
        topk_log_probs[row, prompt_width - 1 : prompt_width - 1 + len(ids)] = log_probs
    return SequenceBatch(input_ids, attention_mask, position_ids, loss_mask, topk_ids, topk_log_probs)

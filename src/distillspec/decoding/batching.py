"""Prompt batches: left padding, and turning a padded batch back into per-row token lists."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask) [B, L]``: each prompt right-aligned, pads on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token (and the batch one prompt).")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[list[int]]:
    """The real tokens of each row of a left-padded batch, checking the layout."""
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be 2-D [batch, length], got shape {tuple(input_ids.shape)}. "
            "Wrap a single prompt as input_ids[None]."
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
            f"shape {tuple(input_ids.shape)}."
        )
    mask = attention_mask.bool().cpu()
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0 or bool((mask.sum(dim=1) == 0).any()):
        raise ValueError(
            "Empty prompt: every row needs at least one token. Add a BOS token or some text."
        )
    if bool((~mask[:, -1]).any()):
        raise ValueError(
            "Prompts must be left-padded (the last column must be a real token in every row). "
            "Set tokenizer.padding_side = 'left'."
        )
    ids = input_ids.cpu()
    return [ids[row][mask[row]].tolist() for row in range(ids.shape[0])]

"""A model with its KV cache, for batched decoding with per-row rollback.

Rows of a batch accept different numbers of draft tokens, so their caches would have different
lengths. We keep one rectangular cache and a per-row *slot mask*: every forward appends the same
number of slots to every row, a rollback marks a row's rejected trailing slots invalid (mask 0),
and the slots that are invalid in *every* row are cropped away (``DynamicCache.crop(-n)``). At
batch 1 this is exactly "crop the rejected tokens"; at batch > 1 a row may carry a few masked
holes, which attention ignores. Positions are counted per row over valid slots only, so holes and
left padding never shift RoPE positions.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel


def ensure_croppable(model: PreTrainedModel) -> None:
    """Fail early for models whose cache cannot be rolled back (sliding-window, recurrent...)."""
    cache = DynamicCache(config=model.config)
    if not getattr(cache, "is_croppable", True):
        raise ValueError(
            f"{type(model).__name__} uses a cache that cannot be cropped (sliding-window or "
            "recurrent layers), so rejected draft tokens cannot be rolled back. Use a model with "
            "full attention layers for speculative decoding."
        )


class CachedModel:
    """``model`` plus a DynamicCache, the valid-slot mask ``[B, S]`` and next positions ``[B]``."""

    def __init__(self, model: PreTrainedModel, batch_size: int, device: torch.device):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.slot_mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.embedding_rows = model.get_input_embeddings().weight.shape[0]
        self.attention_impl = getattr(model.config, "_attn_implementation", None)

    @property
    def num_slots(self) -> int:
        return self.slot_mask.shape[1]

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, valid: torch.Tensor, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Append ``tokens [B, W]`` (``valid [B, W]`` marks real ones) and return their logits.

        ``logits_to_keep`` > 0 computes the LM head for the last that many positions only.
        Ids beyond this model's embedding matrix (the other model's padding rows) are clamped:
        such a drafted token has target probability 0 and is always rejected, and a context
        token the draft cannot embed only changes q, which the rule accounts for.
        """
        tokens = tokens.clamp(max=self.embedding_rows - 1)
        valid = valid.to(torch.long)
        positions = self.next_position.unsqueeze(1) + torch.cumsum(valid, dim=1) - valid
        self.slot_mask = torch.cat([self.slot_mask, valid], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self._attention_mask(tokens.shape[1]),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        self.next_position = self.next_position + valid.sum(dim=1)
        return out.logits

    def _attention_mask(self, width: int) -> torch.Tensor:
        """The 4-D mask for the last ``width`` slots attending to all slots.

        Built here rather than by ``transformers`` from the 2-D slot mask: for one-token draft
        steps the library's mask construction costs more than the attention itself (~4 ms of a
        ~13 ms SmolLM2 4-layer step on CPU). Key j is visible to query i when it is a valid slot
        at or before the query. Each query also sees itself, so pad and dummy queries (whose
        outputs are never used) never have an all-masked row, which would produce NaN.
        """
        if self.attention_impl not in ("sdpa", "eager"):
            return self.slot_mask  # e.g. flash-attention kernels take the 2-D padding mask
        total = self.num_slots
        query_slots = torch.arange(total - width, total, device=self.slot_mask.device)
        key_slots = torch.arange(total, device=self.slot_mask.device)
        causal = key_slots.unsqueeze(0) <= query_slots.unsqueeze(1)  # [W, S]
        visible = causal.unsqueeze(0) & self.slot_mask.bool().unsqueeze(1)  # [B, W, S]
        visible |= key_slots.unsqueeze(0) == query_slots.unsqueeze(1)
        visible = visible.unsqueeze(1)  # [B, 1, W, S]
        if self.attention_impl == "eager":  # eager adds the mask to the scores
            blocked = torch.finfo(self.model.dtype).min
            return torch.zeros(
                visible.shape, dtype=self.model.dtype, device=visible.device
            ).masked_fill(~visible, blocked)
        return visible

    def rollback(self, num_rejected: torch.Tensor) -> None:
        """Forget each row's last ``num_rejected[b]`` slots (all of them valid before the call)."""
        if self.num_slots == 0:
            return
        slot_index = torch.arange(self.num_slots, device=self.slot_mask.device)
        keep = slot_index.unsqueeze(0) < (self.num_slots - num_rejected).unsqueeze(1)
        self.slot_mask = self.slot_mask * keep
        self.next_position = self.next_position - num_rejected
        self._crop_common_tail()

    def _crop_common_tail(self) -> None:
        """Drop trailing slots that no row uses; they would only cost attention time."""
        used = self.slot_mask.any(dim=0).nonzero()
        last_used = int(used.max()) + 1 if used.numel() else 0
        unused_tail = self.num_slots - last_used
        if unused_tail > 0:
            self.cache.crop(-unused_tail)  # transformers 5.x: negative = remove that many
            self.slot_mask = self.slot_mask[:, :last_used]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (e.g. drop finished sequences) in cache, mask and positions."""
        self.cache.batch_select_indices(rows)
        self.slot_mask = self.slot_mask[rows]
        self.next_position = self.next_position[rows]

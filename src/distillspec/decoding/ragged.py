"""Ragged calls: rows of different widths in one forward, with no padding in the linear layers.

A plain decoding step feeds one token per running row. A row joining the batch has its whole
prompt to read, and used to get a prefill pass of its own before the step: on the 2-core CPU a
1-row 50-token prefill cost 54 ms and a 16-row step 52 ms, so at 16 clients every join cost
about one more step (docs/results/serve-open-loop). A padded call of both would compute every
row at the prompt's width. A ragged call packs the step's tokens into one sequence ``[1, N]``
(each running row's token, or its verify block ``[pending, x_1..x_g]`` on a drafting chain
step; each joining row's prompt, followed by its block): embeddings, norms, the linear layers and
the MLP see N rows, and only attention is computed per row, in groups of rows of one width (the
running rows' queries together; the joining prompts together, left-padded among themselves),
each against its own rows' cache slots. The tokens and positions are the ones
the two passes had, so the outputs are the same up to the rounding of other matrix shapes.

``CachedModel.forward_ragged`` lays the call out (``layout``), the cache writes each packed
token's key and value at its (row, slot) (``_SlotLayer.update``), and ``ragged_attention``
(registered as an attention function, switched in for the call) reads the layout from a context
variable. Models with sliding-window layers, soft caps or position biases are not covered
(``supports``): they keep the separate prefill.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from distillspec.decoding.attention import gqa_sdpa

NAME = "distillspec_ragged_sdpa"
# Architectures whose attention is plain causal self-attention through the attention interface
# (no sliding window by default, no soft cap, no position bias).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RaggedGroup:
    """Consecutive cache rows whose queries have one width (``width`` columns ending at the
    call's last slot, the shorter rows left-padded)."""

    rows: slice
    width: int
    query_index: torch.Tensor  # [rows, width]: each query's place in the packed tokens; N for a pad
    mask: torch.Tensor  # [rows, 1, width, end] bool: which slots each query sees


@dataclass(frozen=True)
class RaggedCall:
    """Where a ragged call's packed tokens go and how its attention is grouped."""

    groups: tuple[RaggedGroup, ...]
    row_index: torch.Tensor  # [N] the cache row of each packed token
    slot_index: torch.Tensor  # [N] its slot
    end: int  # one past the last slot written

    @property
    def rows(self) -> int:
        """Rows in the call: the groups cover them in order."""
        return self.groups[-1].rows.stop


_CALL: contextvars.ContextVar[RaggedCall | None] = contextvars.ContextVar("ragged", default=None)


def supports(model) -> bool:
    """Whether ``model`` can take ragged calls: a listed architecture on sdpa attention, on one
    device, with every layer attending to the full context (Mistral's default sliding window
    excludes it unless the config turns the window off)."""
    config = model.config
    if config.model_type not in MODEL_TYPES or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        return False  # the call's index tensors live on one device
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


def runs(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first row, row count, width)`` of each maximal run of consecutive rows that are all
    as narrow as the narrowest row (running rows: one token, or one verify block each) or all
    wider (rows reading their prompts); a wider run's width is its widest row. (Grouping a
    verify block with the prompts would pad its queries to a prompt's width.)"""
    narrowest = min(counts, default=1)
    groups: list[tuple[int, int, int]] = []
    for row, count in enumerate(counts):
        if groups and (count > narrowest) == (groups[-1][2] > narrowest):
            first, size, width = groups[-1]
            groups[-1] = (first, size + 1, max(width, count))
        else:
            groups.append((row, 1, count))
    return groups


def query_index(counts: Sequence[int], offsets: Sequence[int], first: int, size: int,
                width: int, total: int) -> torch.Tensor:
    """``[size, width]``: the packed index of each query of rows ``first .. first + size``,
    right-aligned (row r's token i at column ``width - counts[r] + i``); ``total`` (one past
    the last packed token) marks a pad."""
    index = torch.full((size, width), total, dtype=torch.long)
    for local in range(size):
        count, offset = counts[first + local], offsets[first + local]
        index[local, width - count :] = torch.arange(offset, offset + count)
    return index


def packed_slots(counts: Sequence[int], end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_index, slot_index) [N]``: the cache row and slot of each packed token, row r's
    ``counts[r]`` tokens ending at slot ``end - 1``."""
    row_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    slot_index = torch.cat([torch.arange(end - count, end) for count in counts])
    return row_index.to(device), slot_index.to(device)


def layout(counts: Sequence[int], end: int, positions: Sequence[int],
           slots: tuple[torch.Tensor, torch.Tensor],
           mask_for: Callable[[slice, int, int], torch.Tensor]):
    """A ragged call of ``counts[r]`` tokens for row r at ``slots`` (``packed_slots``):
    ``(RaggedCall, positions [1, N], last)``, where row r's tokens continue from its position
    ``positions[r]`` and ``last [rows]`` is each row's last token in the packed order.
    ``mask_for(rows, start, width)``: the attention mask of those rows' queries at slots
    ``[start, start + width)`` (``CachedModel._attention_mask``; the slot mask must already
    mark this call's slots)."""
    row_index, slot_index = slots
    device = row_index.device
    offsets = list(itertools.accumulate(counts, initial=0))[:-1]
    total = sum(counts)
    token_positions = torch.cat([torch.arange(positions[row], positions[row] + count)
                                 for row, count in enumerate(counts)])
    groups = tuple(
        RaggedGroup(slice(first, first + size), width,
                    query_index(counts, offsets, first, size, width, total).to(device),
                    mask_for(slice(first, first + size), end - width, width))
        for first, size, width in runs(counts))
    last = torch.tensor([offset + count - 1 for offset, count in zip(offsets, counts)],
                        device=device)
    call = RaggedCall(groups, row_index, slot_index, end)
    return call, token_positions.unsqueeze(0).to(device), last


def ragged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     is_causal=None, **kwargs):
    """Attention of a ragged call: ``query [1, H, N, D]`` (the packed tokens), ``key`` /
    ``value [rows, H_kv, end, D]`` (every row's slots, this call's included); per group,
    ``softmax(q kᵀ · scale + mask) v`` of its rows' queries against its rows' keys; returns
    ``[1, N, H, D]`` in packed order. ``attention_mask`` is unused (the groups carry theirs)."""
    call = _CALL.get()
    if call is None or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise RuntimeError("ragged_attention runs inside CachedModel.forward_ragged only, for "
                           "plain causal attention.")
    heads, total, dim = query.shape[1], query.shape[2], query.shape[3]
    # One zero query past the packed tokens: what every pad reads and writes.
    queries = torch.cat([query[0], query.new_zeros(heads, 1, dim)], dim=1)  # [H, N + 1, D]
    output = query.new_zeros(total + 1, heads, dim)
    for group in call.groups:
        grouped = queries[:, group.query_index].transpose(0, 1)  # [rows, H, width, D]
        result = gqa_sdpa(grouped, key[group.rows], value[group.rows], group.mask, scaling)
        output[group.query_index.reshape(-1)] = result.transpose(1, 2).reshape(-1, heads, dim)
    return output[:total].unsqueeze(0), None


AttentionInterface.register(NAME, ragged_attention)


@contextlib.contextmanager
def ragged(model, call: RaggedCall) -> Iterator[None]:
    """Inside, ``model`` attends through ``ragged_attention`` with ``call``'s layout."""
    config = model.config
    previous = config._attn_implementation_internal
    token = _CALL.set(call)
    config._attn_implementation_internal = NAME
    try:
        yield
    finally:
        config._attn_implementation_internal = previous
        _CALL.reset(token)

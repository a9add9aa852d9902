"""Grouped-query attention without copying keys and values.

With an explicit mask, ``transformers``' sdpa path repeats every key/value head to the number
of query heads (``repeat_kv``) before calling ``scaled_dot_product_attention``: a copy of the
whole cache per layer per call. Two ways avoid the copy:

* ``enable_gqa=True``: the kernel maps each query head to its key/value head (bit for bit the
  repeated heads' result on CPU);
* *packing* the query heads of a group into rows: queries ``[B, H, W, D]`` become
  ``[B, H_kv, G * W, D]`` (row ``g * W + i`` is head ``h_kv * G + g`` at query ``i``), the mask
  ``[B, 1, W, S]`` repeated ``G`` times along its rows, so every key/value head is read once
  for ``G * W`` query rows (the same attention; in bf16 it rounds differently, so greedy
  outputs may part at near-ties, as between any two bf16 decoders).

When each is faster was measured (docs/results/gqa-packed, 2 threads, an AVX-512 EPYC, torch
2.13): CPU's flash-attention kernel in bf16 is slow for **one** query row (per layer, 9 query
heads over 3 key/value heads: 68 / 113 / 231 µs after 96 / 192 / 384 keys with ``enable_gqa``,
28 / 38 / 56 µs packed into 3 rows); from 2 queries on the two are level within noise, and from
8 on packing is slower; in float32 packing never wins. A one-token decoding step, the commonest
call there is, is exactly the slow case, so bf16/fp16 calls of one query are packed and every
other call takes ``enable_gqa``. (``transformers`` packs one query too, but only eager, not
under ``torch.compile``.) ``CachedModel`` switches a model to this function for its own calls
on CPU (``gqa_attention``); anything it does not handle (no mask, a float mask, position bias,
softcap) goes to ``transformers``' sdpa unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "distillspec_gqa_sdpa"
PACK_SINGLE_QUERY = True  # off: every call takes enable_gqa (the side-by-side scripts' switch)


def packs(query: torch.Tensor) -> bool:
    """Whether a call with ``query [B, H, W, D]`` is packed: one query row in bf16/fp16."""
    return PACK_SINGLE_QUERY and query.shape[2] == 1 and query.dtype in (
        torch.bfloat16, torch.float16)


def packed_gqa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask) v`` for ``query [B, H, W, D]`` over ``key``/``value``
    ``[B, H_kv, S, D]`` with ``H = G · H_kv``, computed with each group's heads packed into
    query rows; returns ``[B, H, W, D]``."""
    batch, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    packed = query.reshape(batch, kv_heads, groups * width, dim)
    if width > 1:  # rows g*W + i all read mask row i; one query row broadcasts as it is
        mask = mask.repeat(1, 1, groups, 1)
    output = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=mask, scale=scale
    )
    return output.reshape(batch, heads, width, dim)


def gqa_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
             scale: float | None, dropout: float = 0.0) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask) v`` for ``query [B, H, W, D]`` over ``key``/``value``
    ``[B, H_kv, S, D]`` (``H`` a multiple of ``H_kv``) with a bool ``mask [B, 1, W, S]``,
    without copying keys and values: packed (``packs``) or with ``enable_gqa``; returns
    ``[B, H, W, D]``."""
    if dropout == 0.0 and mask.shape[1] == 1 and packs(query):
        return packed_gqa_attention(query, key, value, mask, scale)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=True)


def gqa_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     is_causal=None, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if groups > 1 and plain and isinstance(attention_mask, torch.Tensor) and (
        attention_mask.dtype == torch.bool
    ):
        output = gqa_sdpa(query, key, value, attention_mask, scaling, dropout)
        return output.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


AttentionInterface.register(NAME, gqa_sdpa_forward)


@contextlib.contextmanager
def gqa_attention(model: torch.nn.Module) -> Iterator[None]:
    """Inside, a CPU model configured for sdpa uses ``gqa_sdpa_forward`` instead."""
    config = model.config
    if getattr(config, "_attn_implementation_internal", None) != "sdpa" or model.device.type != "cpu":
        yield
        return
    config._attn_implementation_internal = NAME
    try:
        yield
    finally:
        config._attn_implementation_internal = "sdpa"

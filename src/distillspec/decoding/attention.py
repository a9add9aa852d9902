"""Grouped-query attention without copying keys and values.

With an explicit mask, ``transformers``' sdpa path repeats every key/value head to the number
of query heads (``repeat_kv``) before calling ``scaled_dot_product_attention``: a copy of the
whole cache per layer per call. ``scaled_dot_product_attention(enable_gqa=True)`` computes the
same result (bit for bit on CPU) from the unrepeated heads. ``CachedModel`` switches a model to
this function for its own calls on CPU (``gqa_attention``); anything it does not handle (no
mask, a float mask, position bias, softcap) goes to ``transformers``' sdpa unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "distillspec_gqa_sdpa"


def gqa_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     is_causal=None, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if groups > 1 and plain and isinstance(attention_mask, torch.Tensor) and (
        attention_mask.dtype == torch.bool
    ):
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            enable_gqa=True,
        )
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

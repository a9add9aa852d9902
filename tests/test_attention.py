"""Grouped-query attention without repeating keys and values (decoding/attention.py), against
transformers' own sdpa path (which repeats them), with no model."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from distillspec.decoding import attention
from distillspec.decoding.attention import gqa_sdpa_forward, packed_gqa_attention, packs


class _Layer(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def _inputs(width: int, dtype, batch: int = 2, kv_heads: int = 2, keys: int = 37, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * _Layer.num_key_value_groups

    def normal(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    query, key, value = normal(batch, heads, width, 8), normal(batch, kv_heads, keys, 8), normal(
        batch, kv_heads, keys, 8)
    mask = torch.rand(batch, 1, width, keys, generator=generator) < 0.7
    mask[..., -1] = True  # every query row sees something (its own slot, in the engine)
    return query, key, value, mask


@pytest.mark.parametrize("width", [1, 2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_heads_equal_repeated_heads(width, dtype):
    query, key, value, mask = _inputs(width, dtype)
    repeated = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1),
        attn_mask=mask, scale=0.3,
    )
    packed = packed_gqa_attention(query, key, value, mask, 0.3)
    assert packed.shape == repeated.shape
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed, repeated, atol=tolerance, rtol=tolerance)
    # a negative control: the mask's rows matter, so misplacing them must show
    if width > 1:
        wrong = packed_gqa_attention(query, key, value, mask.flip(2), 0.3)
        assert not torch.allclose(wrong, repeated, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("width", [1, 4, 40])  # 40: past the packed widths, enable_gqa
def test_the_engine_attention_equals_transformers_sdpa(width):
    query, key, value, mask = _inputs(width, torch.float32)
    ours, _ = gqa_sdpa_forward(_Layer(), query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(_Layer(), query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (2, width, 6, 8)  # [B, W, H, D], as transformers returns
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_only_one_query_in_bf16_or_fp16_is_packed(monkeypatch):
    def query(width, dtype):
        return torch.zeros(1, 6, width, 8, dtype=dtype)

    assert packs(query(1, torch.bfloat16)) and packs(query(1, torch.float16))
    assert not packs(query(2, torch.bfloat16)) and not packs(query(1, torch.float32))
    monkeypatch.setattr(attention, "PACK_SINGLE_QUERY", False)
    assert not packs(query(1, torch.bfloat16))


def test_a_packed_bf16_step_equals_transformers_sdpa(monkeypatch):
    query, key, value, mask = _inputs(1, torch.bfloat16)
    calls = []
    real = attention.packed_gqa_attention
    monkeypatch.setattr(attention, "packed_gqa_attention",
                        lambda *args: calls.append(1) or real(*args))
    ours, _ = gqa_sdpa_forward(_Layer(), query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(_Layer(), query, key, value, mask, scaling=0.25)
    assert calls == [1]  # the packed route ran
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)

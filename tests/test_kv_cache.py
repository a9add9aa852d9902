"""KV rollback: extend, crop, extend gives the logits of an uncached forward."""

from __future__ import annotations

import torch
from conftest import left_padded, tiny_model

from distillspec.kv_cache import CachedModel


def uncached_last_logits(model, rows):
    """Logits of the last position of each row (list of token lists), no cache, no padding."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([r])).logits[0, -1] for r in rows])


def test_extend_crop_extend_batch1():
    model = tiny_model("llama")
    cached = CachedModel(model, 1, torch.device("cpu"))
    cached.forward(torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4))
    cached.forward(torch.tensor([[9, 10, 11]]), torch.ones(1, 3))
    cached.rollback(torch.tensor([2]))  # forget 10, 11
    assert cached.cache.get_seq_length() == 5 and cached.num_slots == 5
    logits = cached.forward(torch.tensor([[12, 13]]), torch.ones(1, 2))[:, -1]
    torch.testing.assert_close(
        logits, uncached_last_logits(model, [[5, 6, 7, 8, 9, 12, 13]]), atol=1e-5, rtol=1e-5
    )


def test_per_row_rollback_with_holes_and_left_padding():
    model = tiny_model("qwen2")
    input_ids, attention_mask = left_padded([3, 6])
    prompts = [input_ids[0, 3:].tolist(), input_ids[1].tolist()]
    cached = CachedModel(model, 2, torch.device("cpu"))
    cached.forward(input_ids, attention_mask)
    cached.forward(torch.tensor([[20, 21, 22], [30, 31, 32]]), torch.ones(2, 3))
    cached.rollback(torch.tensor([2, 0]))  # row 0 keeps 20; row 1 keeps 30 31 32
    assert cached.num_slots == 9  # nothing common to crop: row 0 carries two masked holes
    cached.forward(torch.tensor([[40, 41], [0, 50]]), torch.tensor([[1, 1], [0, 1]]))  # dummy slot
    cached.rollback(torch.tensor([1, 1]))  # both forget their last token: common tail cropped
    assert cached.num_slots == 10
    logits = cached.forward(torch.tensor([[60], [70]]), torch.ones(2, 1))[:, -1]
    expected = uncached_last_logits(
        model, [prompts[0] + [20, 40, 60], prompts[1] + [30, 31, 32, 70]]
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_select_rows_drops_finished_sequences():
    model = tiny_model("llama")
    input_ids, attention_mask = left_padded([4, 2, 5])
    cached = CachedModel(model, 3, torch.device("cpu"))
    cached.forward(input_ids, attention_mask)
    cached.select_rows(torch.tensor([0, 2]))
    logits = cached.forward(torch.tensor([[7], [8]]), torch.ones(2, 1))[:, -1]
    expected = uncached_last_logits(
        model, [input_ids[0, 1:].tolist() + [7], input_ids[2].tolist() + [8]]
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

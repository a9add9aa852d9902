"""KV cache: extend, roll back, join, leave and compact give the logits of an uncached forward."""

from __future__ import annotations

import torch
from conftest import left_padded, tiny_model

from distillspec.decoding.kv_cache import CachedModel


def uncached_last_logits(model, rows):
    """Logits of the last position of each row (list of token lists), no cache, no padding."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([r])).logits[0, -1] for r in rows])


def pads_of(attention_mask):
    return (attention_mask == 0).sum(dim=1).tolist()


def test_extend_rollback_extend_batch1():
    model = tiny_model("llama")
    cached = CachedModel(model, rows=1, slots=4)  # small on purpose: the buffers must grow
    cached.forward(torch.tensor([[5, 6, 7, 8]]))
    cached.forward(torch.tensor([[9, 10, 11]]))
    cached.rollback([2])  # forget 10, 11
    assert cached.length == 5 and cached.positions == [5]
    logits = cached.forward(torch.tensor([[12, 13]]))[:, -1]
    torch.testing.assert_close(
        logits, uncached_last_logits(model, [[5, 6, 7, 8, 9, 12, 13]]), atol=1e-5, rtol=1e-5
    )


def test_per_row_rollback_with_holes_and_left_padding():
    model = tiny_model("qwen2")
    input_ids, attention_mask = left_padded([3, 6])
    prompts = [input_ids[0, 3:].tolist(), input_ids[1].tolist()]
    cached = CachedModel(model, rows=2)
    cached.forward(input_ids, pads_of(attention_mask))
    cached.forward(torch.tensor([[20, 21, 22], [30, 31, 32]]))
    cached.rollback([2, 0])  # row 0 keeps 20; row 1 keeps 30 31 32
    assert cached.length == 9  # nothing common to free: row 0 carries two masked holes
    cached.forward(torch.tensor([[40, 41], [0, 50]]), [0, 1])  # a dummy slot in row 1
    cached.rollback([1, 1])  # both forget their last token: the common tail is freed
    assert cached.length == 10
    logits = cached.forward(torch.tensor([[60], [70]]))[:, -1]
    expected = uncached_last_logits(
        model, [prompts[0] + [20, 40, 60], prompts[1] + [30, 31, 32, 70]]
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_remove_rows_drops_finished_sequences():
    model = tiny_model("llama")
    input_ids, attention_mask = left_padded([4, 2, 5])
    cached = CachedModel(model, rows=3)
    cached.forward(input_ids, pads_of(attention_mask))
    assert cached.remove_rows([1]) == [0, 2]
    logits = cached.forward(torch.tensor([[7], [8]]))[:, -1]
    expected = uncached_last_logits(
        model, [input_ids[0, 1:].tolist() + [7], input_ids[2].tolist() + [8]]
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_rows_join_a_running_batch_without_disturbing_it():
    model = tiny_model("llama")
    cached = CachedModel(model, rows=1)
    cached.forward(torch.tensor([[5, 6, 7, 8, 9, 10]]))
    short = cached.add_rows(1)  # fits before the pointer: written right-aligned to it
    cached.forward(torch.tensor([[20, 21]]), rows=short, right_align=True)
    assert cached.length == 6
    long = cached.add_rows(1)  # longer than the pointer: the others get masked slots
    cached.forward(torch.tensor([list(range(30, 39))]), rows=long, right_align=True)
    assert cached.length == 9
    logits = cached.forward(torch.tensor([[11], [22], [39]]))[:, -1]
    expected = uncached_last_logits(
        model, [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 40))]
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_compaction_keeps_every_row_exact():
    model = tiny_model("qwen2")
    cached = CachedModel(model, rows=2, slots=8)
    cached.forward(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    history = [[5, 6, 7], [8, 9, 10]]
    for step in range(40):  # row 1 rejects everything it drafts: holes pile up in row 1
        cached.forward(torch.tensor([[11 + step % 50, 40], [12, 41]]))
        cached.rollback([0, 2])
        history[0] += [11 + step % 50, 40]
        cached.forward(torch.tensor([[0], [13 + step % 40]]), [1, 0])
        history[1].append(13 + step % 40)
    assert cached.cache.slot_capacity < 4 * 120  # compaction, not unbounded growth
    logits = cached.forward(torch.tensor([[60], [70]]))[:, -1]
    expected = uncached_last_logits(model, [history[0] + [60], history[1] + [70]])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_the_cache_goes_by_the_name_the_installed_transformers_takes():
    """transformers 5.24 calls it ``cache`` (``past_key_values`` deprecated); 5.22 and 5.23 only
    know ``past_key_values`` and silently drop ``cache=``, so every step would attend to its own
    tokens alone (the floors job decodes with 5.22)."""
    import inspect

    from distillspec.decoding.kv_cache import cache_keyword

    model = tiny_model("llama")
    assert cache_keyword(model) in inspect.signature(model.forward).parameters

    class OldForward(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return input_ids

    class NewForward(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            return input_ids

    assert cache_keyword(OldForward()) == "past_key_values" and cache_keyword(NewForward()) == "cache"

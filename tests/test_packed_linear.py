"""Linear layers on packed weights (``decoding.packed_linear``) compute what ``F.linear`` does,
follow weights changed in place, and leave training alone."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, tiny_model

from distillspec.decoding import packed_linear
from distillspec.decoding.packed_linear import packed_linear_eager, packed_linears, packs

needs_bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 kernels here")


@needs_bf16
@pytest.mark.parametrize("rows", [1, 2, 4, 9])
def test_packed_bf16_linear_is_bit_for_bit_f_linear(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).bfloat16()
    bias = torch.randn(96, generator=generator).bfloat16()
    x = torch.randn(1, rows, 64, generator=generator).bfloat16()
    assert torch.equal(packed_linear_eager(x, weight, bias),
                       torch.nn.functional.linear(x, weight, bias))


def test_packed_float32_linear_matches_f_linear():
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 64, generator=generator), torch.randn(3, 5, 64, generator=generator)
    torch.testing.assert_close(packed_linear_eager(x, weight, None),
                               torch.nn.functional.linear(x, weight), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_weight_major_call_matches_f_linear(shape, with_bias):
    generator = torch.Generator().manual_seed(len(shape))
    weight, x = torch.randn(96, 64, generator=generator), torch.randn(*shape, generator=generator)
    bias = torch.randn(96, generator=generator) if with_bias else None
    out = packed_linear._weight_major_call(x, weight, bias)
    assert out.shape == (*shape[:-1], 96) and out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias),
                               atol=1e-5, rtol=1e-5)


@pytest.fixture
def fake_timings(monkeypatch):
    """Timings that make the weight-major call twice as fast; returns the list of timed pairs."""
    monkeypatch.setattr(packed_linear, "_weight_major", {})
    timed = []

    def timed_pair(calls, repeats, device=None):
        timed.append(calls)
        return {"packed": 1.0, "weight_major": 0.5}

    monkeypatch.setattr(packed_linear, "interleaved_medians", timed_pair)
    return timed


def test_the_kernel_is_chosen_by_timing_once_per_shape_and_row_count(fake_timings):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator)
    x4, x3 = torch.randn(4, 64, generator=generator), torch.randn(1, 3, 64, generator=generator)
    for _ in range(3):
        out = packed_linear_eager(x4, weight, None)
    assert len(fake_timings) == 1  # both kernels timed once, then the choice is kept
    assert packed_linear.tunings() == 1  # what a caller timing its steps compares
    assert packed_linear._weight_major[(96, 64, 4, torch.get_num_threads())] is True
    torch.testing.assert_close(out, torch.nn.functional.linear(x4, weight), atol=1e-5, rtol=1e-5)
    packed_linear_eager(x3, weight, None)  # another row count: timed again
    assert len(fake_timings) == 2 and packed_linear.tunings() == 2


def test_one_row_bf16_and_deterministic_calls_are_never_timed(fake_timings):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator)
    packed_linear_eager(torch.randn(1, 64, generator=generator), weight, None)
    assert not packed_linear._prefers_weight_major(torch.randn(4, 64).bfloat16(),
                                                   weight.bfloat16(), None)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        packed_linear_eager(torch.randn(4, 64, generator=generator), weight, None)
    finally:
        torch.use_deterministic_algorithms(False)
    assert fake_timings == []


def test_a_call_over_the_size_cap_stays_packed_untimed(fake_timings, monkeypatch):
    monkeypatch.setattr(packed_linear, "TUNED_MAX_MACS", 96 * 64 * 4)
    weight = torch.randn(96, 64)
    assert packed_linear._prefers_weight_major(torch.randn(4, 64), weight, None)  # at the cap
    assert not packed_linear._prefers_weight_major(torch.randn(5, 64), weight, None)
    assert len(fake_timings) == 1 and packed_linear.tunings() == 1


def test_warm_choices_times_every_shape_and_width_once_so_decoding_times_none(fake_timings):
    torch.manual_seed(0)
    model = tiny_model()
    shapes = {(m.out_features, m.in_features) for m in model.modules()
              if type(m) is torch.nn.Linear}
    with torch.no_grad():
        timed = packed_linear.warm_choices(model, 6)
    assert timed == len(shapes) * 5 == packed_linear.tunings()  # widths 2..6
    assert {key[:3] for key in packed_linear._weight_major} == {
        (*shape, rows) for shape in shapes for rows in range(2, 7)}
    assert packed_linear.warm_choices(model, 6) == 0  # nothing left to time
    ids, _ = left_padded([3, 4])
    with torch.no_grad(), packed_linears(model):
        model(input_ids=ids[:, -1:].contiguous())  # 2 rows: an already timed width
    assert packed_linear.tunings() == timed


@pytest.mark.parametrize("tree", [None, "4:2"])
def test_greedy_sd_is_the_target_s_greedy_output_with_weight_major_verify_calls(
        fake_timings, tree):
    """Every multi-row float32 call weight-major (as on an AVX2 CPU where it times faster):
    SD's greedy output is still the target's own, token for token."""
    from distillspec import autoregressive_generate, speculative_generate

    target, draft = tiny_model("llama", seed=0), tiny_model("llama", seed=3)
    input_ids, attention_mask = left_padded([7, 4])
    with torch.no_grad():
        reference = target.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    max_new_tokens=20, do_sample=False, pad_token_id=0)
    reference = reference[:, input_ids.shape[1]:].tolist()
    options = {"gamma": 1, "tree": tree} if tree else {"gamma": 4}
    result = speculative_generate(target, draft, input_ids, attention_mask, max_new_tokens=20,
                                  **options)
    assert result.sequences == reference
    assert autoregressive_generate(target, input_ids, attention_mask,
                                   max_new_tokens=20).sequences == reference
    assert any(packed_linear._weight_major.values())  # the weight-major call did run


def test_a_weight_changed_in_place_is_packed_again():
    weight, x = torch.randn(32, 16), torch.randn(2, 16)
    before = packed_linear_eager(x, weight, None)
    weight.mul_(-2.0)  # what an optimiser step or load_state_dict does: same storage, new values
    after = packed_linear_eager(x, weight, None)
    torch.testing.assert_close(after, -2.0 * before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, x @ weight.T, atol=1e-5, rtol=1e-5)


def test_a_model_inside_the_context_gives_its_own_logits_and_is_restored():
    model = tiny_model("llama")
    assert packs(model)
    input_ids, attention_mask = left_padded([5, 8])
    with torch.inference_mode():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with packed_linears(model):
            assert "forward" in model.lm_head.__dict__  # the layers did switch
            packed = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all("forward" not in m.__dict__ for m in linears)


def test_training_and_gradients_are_left_alone():
    model = tiny_model("llama").train()
    input_ids, _ = left_padded([6])
    with packed_linears(model):  # gradients on: nothing is swapped
        assert "forward" not in model.lm_head.__dict__
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_trained_weights_reach_the_next_packed_forward():
    """A draft trained in place after decoding (the demo's before/after) decodes with its new
    weights, not the packed copy of the old ones."""
    model = tiny_model("llama")
    input_ids, _ = left_padded([6])
    with torch.inference_mode(), packed_linears(model):
        model(input_ids=input_ids)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits
        with packed_linears(model):
            packed = model(input_ids=input_ids).logits
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)


def test_packing_is_off_when_memory_is_short_when_switched_off_and_for_inference_weights(
        monkeypatch):
    monkeypatch.setattr(packed_linear, "_available_bytes", lambda: 1000)
    assert not packs(tiny_model("llama"))
    monkeypatch.undo()
    monkeypatch.setenv(packed_linear.ENV_SWITCH, "0")
    assert not packs(tiny_model("llama"))
    monkeypatch.undo()
    with torch.inference_mode():
        made_inside = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert not packs(made_inside)
    assert packs(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_compiled_forward_calls_the_packed_operator():
    """torch.compile keeps ``distillspec::packed_linear`` as one opaque call per layer."""
    model = tiny_model("llama")
    seen = []

    def recording_backend(graph_module, example_inputs):
        seen.extend(str(node.target) for node in graph_module.graph.nodes
                    if node.op == "call_function")
        return graph_module.forward

    compiled = torch.compile(lambda ids: model(input_ids=ids).logits, backend=recording_backend)
    input_ids, _ = left_padded([7])
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits
        with packed_linears(model):
            logits = compiled(input_ids)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert sum("packed_linear" in target for target in seen) == linears
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_a_model_trained_with_fused_adamw_between_two_decodings_decodes_with_new_weights():
    """PyTorch's fused AdamW updates weights in place without bumping their version counters:
    each CachedModel packs afresh, so the next decoding sees the trained weights."""
    from distillspec.decoding.kv_cache import CachedModel

    model = tiny_model("llama")
    input_ids, _ = left_padded([6])
    CachedModel(model, rows=1).forward(input_ids)  # packs the weights as they are
    versions = [p._version for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    model.eval()
    assert [p._version for p in model.parameters()] == versions  # nothing to notice the change by
    logits = CachedModel(model, rows=1).forward(input_ids)
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_an_optimiser_step_is_seen_by_a_cache_made_before_it():
    from distillspec.decoding.kv_cache import CachedModel

    model = tiny_model("llama")
    input_ids, _ = left_padded([6])
    cached = CachedModel(model, rows=1)
    cached.forward(input_ids[:, :3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()  # no version bump: the step hook drops the packed copies
    model.eval()
    cached.rollback([3])
    logits = cached.forward(input_ids[:, :3])
    with torch.inference_mode():
        expected = model(input_ids=input_ids[:, :3]).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_a_write_through_data_is_seen_by_the_next_cache():
    from distillspec.decoding.kv_cache import CachedModel

    model = tiny_model("llama")
    input_ids, _ = left_padded([6])
    CachedModel(model, rows=1).forward(input_ids)
    for parameter in model.parameters():
        parameter.data.mul_(1.5)  # `.data` hides the write from the version counter
    logits = CachedModel(model, rows=1).forward(input_ids)
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_a_call_with_gradients_on_inside_the_context_still_trains():
    """Grad mode is per thread: a thread training the module while another decodes with it
    (inside the context) must get F.linear, with its gradients."""
    model = tiny_model("llama")
    input_ids, _ = left_padded([6])
    with torch.no_grad(), packed_linears(model):
        assert "forward" in model.lm_head.__dict__
        with torch.enable_grad():
            loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.lm_head.parameters())


def test_a_model_cast_after_a_packed_decode_is_decided_again():
    """The decision follows the weights: cast to float64 (no packed kernels), the layers run
    F.linear and give the model's own logits; back to float32, they pack again."""
    model = tiny_model("llama")
    input_ids, _ = left_padded([6])
    assert packs(model)
    model.double()
    assert not packs(model)
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits
        with packed_linears(model):
            assert "forward" not in model.lm_head.__dict__
            logits = model(input_ids=input_ids).logits
    assert torch.equal(logits, expected)
    model.float()
    assert packs(model)


@pytest.mark.parametrize("value", ["off", "false", "2"])
def test_a_switch_value_that_would_be_ignored_is_refused(monkeypatch, value):
    monkeypatch.setenv(packed_linear.ENV_SWITCH, value)
    with pytest.raises(ValueError, match="use 1 .* or 0"):
        packs(tiny_model("llama"))

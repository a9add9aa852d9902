"""Int8 drafts (--draft-quantize int8): what is quantized, that SD stays lossless with one, and
the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, left_padded, perturbed_copy, save_tiny, tiny_model
from test_engine_sampled import (
    PROMPT,
    exact_two_token_joint,
    sampled_two_tokens,
    softened_target,
    tv,
)

from distillspec import autoregressive_generate, speculative_generate
from distillspec.common.runtime import RuntimeConfig, pair_options
from distillspec.decoding.params import SamplingConfig
from distillspec.models.compilation import decide
from distillspec.models.loading import load_pair
from distillspec.models.pruned_head import PrunedHead, prune_head
from distillspec.models.quantize import draft_quantization, quantize_draft
from distillspec.tools.configs import BenchServeConfig, ExportConfig
from distillspec.tools.generate import load_for_decoding
from distillspec.training.config import DatagenConfig, DistillConfig


def float_linears(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def test_int8_replaces_every_linear_and_keeps_the_logits_close():
    model = tiny_model("llama", seed=0).to(torch.bfloat16)
    ids, _ = left_padded([7, 7])
    reference = copy.deepcopy(model).float()(ids).logits
    quantized = quantize_draft(model, "int8")
    assert float_linears(quantized) == [] and draft_quantization(quantized) == "int8"
    assert quantized.dtype == torch.float32  # the int8 kernels take float32 activations
    logits = quantized(ids).logits
    assert not torch.equal(logits, reference), "int8 weights change the logits a little"
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.995
    assert quantize_draft(quantized, "int8") is quantized  # idempotent
    untouched = tiny_model("llama", seed=0)
    assert quantize_draft(untouched, "none") is untouched and float_linears(untouched)


def test_int8_pruned_head_keeps_minus_inf_outside_its_ids():
    kept = torch.tensor([0, 1, 2, 5, 9, 40, 95])
    model = prune_head(tiny_model("llama", seed=0), kept)
    hidden = torch.randn(2, 3, model.config.hidden_size)
    reference = model.get_output_embeddings()(hidden)
    quantize_draft(model, "int8")
    head = model.get_output_embeddings()
    assert isinstance(head, PrunedHead) and head.kept_linear is not None
    logits = head(hidden)
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[kept] = False
    assert torch.isneginf(logits[..., others]).all()
    torch.testing.assert_close(logits[..., kept], reference[..., kept], atol=0.05 * reference[
        ..., kept].abs().max().item(), rtol=0.0)


@pytest.mark.parametrize("gamma,tree", [(1, ""), (4, ""), (3, "4:2"), (3, "dyn:6:3:3")])
def test_greedy_sd_with_an_int8_draft_equals_the_target(gamma, tree):
    """float32 target: exact. The draft's proposals change, the target's tokens do not."""
    target = tiny_model("llama", seed=0)
    ids, mask = left_padded([5, 9, 3])
    plain = autoregressive_generate(target, ids, mask, max_new_tokens=20)
    draft = quantize_draft(perturbed_copy(target, 0.05), "int8")
    assert float_linears(draft) == []
    result = speculative_generate(target, draft, ids, mask, gamma=gamma, max_new_tokens=20,
                                  tree=tree)
    assert result.sequences == plain.sequences
    assert 0 < result.metrics.acceptance_rate < 1


def test_sampled_sd_with_an_int8_draft_matches_the_target_joint():
    """The rule reads q from the int8 draft's own logits, the distribution it sampled from."""
    target = softened_target()
    draft = quantize_draft(perturbed_copy(target, 0.6, seed=4), "int8")
    assert float_linears(draft) == []
    sampling = SamplingConfig(temperature=1.0)
    expected = exact_two_token_joint(target, PROMPT, sampling)
    assert tv(exact_two_token_joint(draft, PROMPT, sampling), expected) > 0.15
    observed, result = sampled_two_tokens(target, draft)
    assert tv(observed, expected) < 0.07
    total = result.metrics.total
    assert total.per_position_acceptance[0] == pytest.approx(total.analytic_alpha, abs=0.08)


def test_load_pair_quantizes_the_draft_only(tmp_path):
    target_dir = save_tiny(tmp_path / "target", seed=0)
    draft_dir = save_tiny(tmp_path / "draft", seed=1)
    runtime = RuntimeConfig(device="cpu", dtype="float32", draft_quantize="int8")
    target, draft, _ = load_pair(target_dir, draft_dir, **pair_options(runtime))
    assert float_linears(draft) == [] and draft_quantization(draft) == "int8"
    assert float_linears(target) and draft_quantization(target) == "none"
    decision = decide("on", draft, "draft")
    assert not decision.compiled and "int8" in decision.reason


def test_bad_draft_quantization_settings_are_refused():
    with pytest.raises(ValueError, match="none, int8"):
        RuntimeConfig(draft_quantize="int4")
    with pytest.raises(ValueError, match="--deterministic"):
        RuntimeConfig(deterministic=True, draft_quantize="int8")
    for command, config in [("distill", DistillConfig), ("datagen", DatagenConfig)]:
        with pytest.raises(ValueError, match=f"--draft-quantize int8 .* {command}"):
            config(data="builtin:chat", runtime=RuntimeConfig(draft_quantize="int8"))
    with pytest.raises(ValueError, match="--url"):
        BenchServeConfig(url="http://127.0.0.1:1", runtime=RuntimeConfig(draft_quantize="int8"))
    with pytest.raises(ValueError, match="--draft none"):
        load_for_decoding("unused", "none", RuntimeConfig(draft_quantize="int8"), "off")
    with pytest.raises(ValueError, match="export"):
        ExportConfig(model="m", out="o", runtime=RuntimeConfig(draft_quantize="int8"))
    with pytest.raises(ValueError, match="CPU"):
        quantize_draft(tiny_model("llama", seed=0).to("meta"), "int8")


def test_auto_loads_the_weights_the_demo_measured_faster_here(tmp_path, capsys):
    """--draft-quantize auto (the default): int8 where the draft folder's saved measurement (by
    the demo) says int8 was faster with this target on this machine kind and dtype; the draft
    as loaded where nothing was measured here, under --deterministic, or with none."""
    import json

    from distillspec.models.recommended import FILE, save_recommended, saved_setting

    target_dir = save_tiny(tmp_path / "target", seed=0)
    draft_dir = save_tiny(tmp_path / "draft", seed=1)
    auto = RuntimeConfig(device="cpu", dtype="float32")
    assert auto.draft_quantize == "auto"

    def weights(runtime) -> str:
        return draft_quantization(load_pair(target_dir, draft_dir, **pair_options(runtime))[1])

    assert weights(auto) == "none"  # nothing measured
    cpu = torch.device("cpu")
    for measured_dtype, expected in ((torch.bfloat16, "none"), (torch.float32, "int8")):
        save_recommended(draft_dir, target=str(target_dir), gamma=1, confidence_threshold=0.0,
                         draft_quantize="int8", device=cpu, dtype=measured_dtype,
                         measured={"speedup": 1.2})
        assert weights(auto) == expected  # measured in another dtype: says nothing here
    assert weights(RuntimeConfig(device="cpu", dtype="float32", draft_quantize="none")) == "none"
    assert weights(RuntimeConfig(device="cpu", dtype="float32", deterministic=True)) == "none"
    load_for_decoding(str(target_dir), str(draft_dir), auto, "off")
    assert "int8 draft weights (`distillspec demo` measured" in capsys.readouterr().err
    saved = json.loads((draft_dir / FILE).read_text())
    (draft_dir / FILE).write_text(json.dumps({**saved, "draft_quantize": "int4"}))
    assert saved_setting(draft_dir) is None and weights(auto) == "none"  # not valid: ignored
    del saved["draft_quantize"]  # written before the demo measured int8: as loaded
    (draft_dir / FILE).write_text(json.dumps(saved))
    assert saved_setting(draft_dir)["draft_quantize"] == "none" and weights(auto) == "none"
    with pytest.raises(ValueError, match="measured_quantization"):
        quantize_draft(tiny_model("llama", seed=0), "auto")


def test_demo_keeps_the_faster_weights():
    from distillspec.tools.demo import faster_weights

    assert faster_weights(None) == "none"  # int8 not measured
    assert faster_weights({"int8_over_none": 1.08}) == "int8"
    assert faster_weights({"int8_over_none": 0.97}) == "none"
    assert faster_weights({"int8_over_none": 1.0}) == "none"  # a tie keeps the weights as loaded

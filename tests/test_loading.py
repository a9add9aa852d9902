"""Model loading from local folders, pair checks, layer-truncated drafts, dtype policy."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, save_tiny, tiny_model, tiny_tokenizer

from distillspec import autoregressive_generate, load_model, load_pair, speculative_generate
from distillspec.common.runtime import resolve_dtype
from distillspec.models.drafts import truncate_layers
from distillspec.models.loading import resolve_model_path


def test_load_folder_and_target_layers_draft(tmp_path):
    folder = save_tiny(tmp_path / "target", layers=4)
    target, draft, tokenizer = load_pair(folder, "target-layers:2", device="cpu", dtype="float32")
    assert target.config.num_hidden_layers == 4 and draft.config.num_hidden_layers == 2
    assert target.dtype == torch.float32 and tokenizer.eos_token == "</s>"
    torch.testing.assert_close(draft.lm_head.weight, target.lm_head.weight)
    assert draft.lm_head.weight.data_ptr() != target.lm_head.weight.data_ptr()  # a copy
    input_ids, attention_mask = left_padded([5, 3])
    plain = autoregressive_generate(target, input_ids, attention_mask, max_new_tokens=10)
    result = speculative_generate(
        target, draft, input_ids, attention_mask, gamma=3, max_new_tokens=10
    )
    assert result.sequences == plain.sequences


def test_truncated_draft_equals_running_the_first_layers():
    target = tiny_model("qwen2", layers=3)
    draft = truncate_layers(target, 1)
    ids = torch.tensor([[4, 9, 12, 30]])
    with torch.no_grad():
        hidden = target.model.embed_tokens(ids)
        position_ids = torch.arange(4)[None]
        rotary = target.model.rotary_emb(hidden, position_ids=position_ids)
        mask = torch.full((4, 4), float("-inf")).triu(1)[None, None]
        hidden = target.model.layers[0](
            hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids
        )
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expected = target.lm_head(target.model.norm(hidden))
        torch.testing.assert_close(draft(ids).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="between 1 and 3"):
        truncate_layers(target, 4)


def test_vocabulary_mismatch_names_both_sizes(tmp_path):
    target = save_tiny(tmp_path / "t", tokenizer=tiny_tokenizer(96))
    draft = save_tiny(tmp_path / "d", vocab_size=80, tokenizer=tiny_tokenizer(80, prefix="v"))
    with pytest.raises(
        ValueError, match=r"target tokenizer has 96 tokens and the draft tokenizer has 80"
    ):
        load_pair(target, draft, device="cpu", dtype="float32")


def test_unknown_paths_and_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ValueError, match="Unknown built-in model"):
        load_model("builtin:nope")
    folder = save_tiny(tmp_path / "m")
    with pytest.raises(ValueError, match="target-layers:N"):
        load_pair(folder, "target-layers:zero", device="cpu", dtype="float32")


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    model = tiny_model()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(ValueError, match="never unpickles"):
        load_model(folder)


def test_dtype_policy():
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("int8")


def test_draft_from_chosen_layers():
    from distillspec.models.drafts import parse_layer_spec

    target = tiny_model("llama", layers=4)
    draft = truncate_layers(target, parse_layer_spec("target-layers:0,3"))
    assert draft.config.num_hidden_layers == 2
    torch.testing.assert_close(
        draft.model.layers[1].mlp.down_proj.weight, target.model.layers[3].mlp.down_proj.weight
    )
    assert parse_layer_spec("target-layers:3") == [0, 1, 2]
    for bad in ("target-layers:3,1", "target-layers:1,1", "target-layers:", "target-layers:0"):
        with pytest.raises(ValueError, match="target-layers"):
            parse_layer_spec(bad)
    with pytest.raises(ValueError, match=r"indices in 0\.\.3"):
        truncate_layers(target, [0, 4])

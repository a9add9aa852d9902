"""Tiny, seeded, random-initialised Hugging Face models and tokenizers built locally (CPU, ms)."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def private_compile_verdicts(tmp_path_factory):
    """Tests (and the CLIs they start) neither read nor write the user's compile verdicts."""
    import os

    os.environ["DISTILLSPEC_COMPILE_VERDICTS"] = str(
        tmp_path_factory.mktemp("verdicts") / "compile-verdicts.json")


def tiny_config(arch: str = "llama", vocab_size: int = VOCAB, layers: int = 2, **overrides):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, lm_scale: float = 30.0, **overrides):
    torch.manual_seed(seed)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    model = cls(tiny_config(arch, **overrides)).eval()
    # Random init gives near-uniform logits; sharpen them so greedy/sampling are meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_scale)
    return model


def perturbed_copy(model, scale: float, seed: int = 123):
    """A draft that partially agrees with ``model``: its weights plus Gaussian noise."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * parameter.std()
            parameter.add_(scale * noise)
    return draft


def tiny_tokenizer(vocab_size: int = VOCAB, prefix: str = "w") -> PreTrainedTokenizerFast:
    """A word-level tokenizer: <pad>, <s>, </s>, <unk> then ``prefix0 prefix1 ...``."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"{prefix}{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def save_tiny(folder, arch="llama", seed=0, tokenizer=None, lm_scale=30.0, **overrides):
    """Save a tiny model + tokenizer as a safetensors HF folder; returns the folder."""
    model = tiny_model(arch, seed=seed, lm_scale=lm_scale, **overrides)
    model.save_pretrained(folder, safe_serialization=True)
    (tokenizer or tiny_tokenizer(model.config.vocab_size)).save_pretrained(folder)
    return folder


def left_padded(lengths, vocab=VOCAB, seed=0):
    """A left-padded batch of random prompts with the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(4, vocab, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


@pytest.fixture
def llama_pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, 0.1)


SERVE_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def start_tiny_server(root, *, lm_scale: float = 10.0, **overrides):
    """A tiny target (3 layers, a plain chat template) saved under ``root`` and served on a free
    loopback port with a 1-layer draft, float32: ``(local server, base url)``; the caller
    exits the server. ``overrides`` replace ServeConfig fields."""
    from distillspec.common.config import from_dict
    from distillspec.tools.bench_serve import LocalServer
    from distillspec.tools.configs import ServeConfig

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = SERVE_CHAT_TEMPLATE
    save_tiny(root / "target", layers=3, lm_scale=lm_scale, tokenizer=tokenizer)
    values = dict(target=str(root / "target"), draft="target-layers:1", port=0,
                  model_name="tiny", max_batch=8, speculation={"gamma": 3},
                  runtime={"device": "cpu", "dtype": "float32"})
    local = LocalServer(from_dict(ServeConfig, {**values, **overrides}))
    return local, local.__enter__()

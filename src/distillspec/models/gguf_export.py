"""Writing a draft as GGUF (llama.cpp's ``-md``), with the ``gguf`` library.

Llama-family (``llama``) and Qwen2 (``qwen2``) architectures. Tensor names come from gguf's own
HF -> GGUF name map; Llama's q/k projections are permuted into the interleaved rotary layout
llama.cpp uses (transformers' GGUF loader undoes exactly this). Matrices are written as f16,
q8_0 or f32; norms and biases stay f32. The tokenizer is written from ``tokenizer.json``
(byte-level BPE: tokens, merges, token types, special ids, chat template); the ``pre``
tokenizer name is copied from the GGUF file the target came from when there is one. The
``general.*`` metadata (``GGUFInfo``) names the draft after its target, never after a path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE values


@dataclass(frozen=True)
class GGUFInfo:
    """The ``general.*`` metadata of an exported draft."""

    name: str = "DistillSpec draft"
    base_model: str | None = None  # the target's Hugging Face Hub id, when known
    licence: str | None = None

    @classmethod
    def for_target(cls, target_hub: str | None, licence: str | None) -> GGUFInfo:
        known = licence if licence and licence != "unknown" else None
        if target_hub is None:
            return cls(licence=known)
        return cls(f"{target_hub.split('/')[-1]} DistillSpec draft", target_hub, known)

    def write(self, writer) -> None:
        writer.add_name(self.name)
        writer.add_tags(["distillspec", "speculative-decoding", "draft-model"])
        if self.licence:
            writer.add_license(self.licence)
        if self.base_model:
            organization, _, name = self.base_model.rpartition("/")
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, name)
            if organization:
                writer.add_base_model_organization(0, organization)
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{self.base_model}")


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotary layout -> llama.cpp's (the inverse of transformers' reverse permute)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _tokenizer_metadata(writer, folder: Path, tokenizer, source_gguf: Path | None) -> None:
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r}. "
            "Export to hf instead, or convert with llama.cpp's convert_hf_to_gguf.py."
        )
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(source_gguf))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                        ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(int(value))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(source_gguf: Path | None) -> str:
    if source_gguf is None or not source_gguf.is_file():
        return "default"
    import gguf

    field = gguf.GGUFReader(str(source_gguf)).fields.get("tokenizer.ggml.pre")
    if field is None:
        return "default"
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def write_gguf(model, tokenizer, folder: Path, path: Path, *, quantization: str = "f16",
               source_gguf: Path | None = None, info: GGUFInfo | None = None) -> Path:
    """Write ``model`` (saved as an HF folder in ``folder``: its tokenizer files) to ``path``."""
    import gguf

    architecture = ARCHITECTURES.get(type(model).__name__)
    if architecture is None:
        raise ValueError(
            f"GGUF export supports {', '.join(ARCHITECTURES)}, not {type(model).__name__}."
        )
    if quantization not in FILE_TYPES:
        raise ValueError(f"quantization must be one of {', '.join(FILE_TYPES)}, got {quantization!r}.")
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    (info or GGUFInfo()).write(writer)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    config.rope_parameters.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(model.get_output_embeddings().weight.shape[0])
    writer.add_file_type(FILE_TYPES[quantization])
    _tokenizer_metadata(writer, folder, tokenizer, source_gguf)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for key, tensor in state.items():
        base, _, suffix = key.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise ValueError(f"No GGUF name for tensor {key}.")
        data = tensor.detach().float().cpu().numpy()
        if architecture == "llama" and name.endswith("attn_q"):
            data = _permute(data, heads)
        elif architecture == "llama" and name.endswith("attn_k"):
            data = _permute(data, kv_heads)
        _add_tensor(writer, f"{name}.{suffix}", data, quantization)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensor(writer, name: str, data: np.ndarray, quantization: str) -> None:
    import gguf

    if data.ndim < 2 or quantization == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif quantization == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape,
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def logits_difference(reference, gguf_path: Path, tokens: torch.Tensor) -> float:
    """Max |logit difference| between ``reference`` and the GGUF file loaded by transformers."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    ).eval()
    with torch.no_grad():
        expected = reference.float()(tokens).logits
        actual = reloaded(tokens).logits
    return float((expected - actual).abs().max())

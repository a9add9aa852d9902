"""Loading models and tokenizers: HF folders (safetensors), GGUF files, built-ins.

Device and dtype policy live here and only here. Weights are read with safetensors (GGUF files
are dequantised by ``transformers`` once and cached as safetensors); pickled checkpoints are never
loaded and ``trust_remote_code`` stays off unless asked for. Nothing is fetched from a hub.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distillspec.drafts import parse_layer_spec, truncate_layers
from distillspec.kv_cache import ensure_croppable
from distillspec.registry import cache_dir as cache_dir  # re-exported
from distillspec.registry import converted_cache_path, resolve_builtin

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- device and dtype policy -------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"Device {device!r} was requested but CUDA is not available here; use cpu or auto."
        )
    return resolved


@cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX (bf16 matmuls there are ~2.5x faster than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(
    dtype: str | torch.dtype = "auto", device: torch.device | None = None
) -> torch.dtype:
    """``auto`` -> bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with native bf16,
    else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}.")
        return DTYPES[dtype]
    device = device or resolve_device("auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


# -- caches ------------------------------------------------------------------------------------
# cache_dir() and converted_cache_path() live in distillspec.registry (no torch import), so that
# `distillspec models list` can report them cheaply; cache_dir is re-exported here.


def convert_gguf(gguf_file: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors HF folder in the cache; return the folder.

    Written to a temporary folder and renamed, so an interrupted conversion leaves nothing behind.
    """
    target = converted_cache_path(gguf_file)
    if (target / "config.json").is_file():
        return target
    print(
        f"distillspec: converting {gguf_file.name} to safetensors in {target} (once)...",
        file=sys.stderr,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
    )
    # save_pretrained refuses a GGUF-loaded model until the quantisation record is dropped.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"{gguf_file.resolve()}\n")
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # a concurrent run may have won the rename
            raise
    return target


# -- models ------------------------------------------------------------------------------------


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A local HF folder for ``spec``: a folder, a ``.gguf`` file (converted) or ``builtin:NAME``."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        return convert_gguf(resolve_builtin(spec))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a folder but has no config.json: not a Hugging Face model folder."
            )
        return path
    raise ValueError(
        f"Model {spec!r} not found: expected a Hugging Face model folder, a .gguf file or "
        "builtin:NAME (see `distillspec models list`). Nothing is downloaded from a hub."
    )


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode on the resolved device and dtype."""
    path = resolve_model_path(spec)
    resolved_device = resolve_device(device)
    if not any(path.glob("*.safetensors")):
        raise ValueError(
            f"{path} has no .safetensors weights. distillspec never unpickles .bin checkpoints; "
            "convert them with `model.save_pretrained(folder, safe_serialization=True)`."
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=resolve_dtype(dtype, resolved_device),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, local_files_only=True
    )
    return model.to(resolved_device).eval(), tokenizer


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a generation: the generation config's EOS ids plus the tokenizer's."""
    config = model.generation_config
    ids = config.eos_token_id if config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used to fill masked slots (any embeddable id works: they are never attended)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def check_same_vocabulary(
    target_tokenizer: PreTrainedTokenizerBase, draft_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Speculative decoding compares token ids, so both tokenizers must map text to the same ids.

    Embedding matrices may be padded to different sizes; only the tokenizers are compared.
    """
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target_vocab != draft_vocab:
        differing = sum(1 for tok, i in draft_vocab.items() if target_vocab.get(tok) != i)
        raise ValueError(
            f"Vocabulary mismatch: the target tokenizer has {len(target_vocab)} tokens and the "
            f"draft tokenizer has {len(draft_vocab)} ({differing} draft tokens map to a different "
            "id or are missing in the target). Speculative decoding and distillation need a draft "
            "that shares the target's tokenizer: pick a draft from the same model family, or "
            "build one from the target with --draft target-layers:N."
        )


def load_pair(
    target: str | os.PathLike,
    draft: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(target, draft, tokenizer)``; ``draft`` may be ``target-layers:N``.

    Checks that the tokenizers agree and that both caches can be rolled back.
    """
    target_model, tokenizer = load_model(
        target, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    num_layers = parse_layer_spec(str(draft))
    if num_layers is not None:
        draft_model = truncate_layers(target_model, num_layers)
    else:
        draft_model, draft_tokenizer = load_model(
            draft, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        check_same_vocabulary(tokenizer, draft_tokenizer)
    ensure_croppable(target_model)
    ensure_croppable(draft_model)
    return target_model, draft_model, tokenizer

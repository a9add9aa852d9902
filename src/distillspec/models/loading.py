"""Loading models and tokenizers: HF folders (safetensors), GGUF files, built-ins.

The device and dtype policy is ``common.runtime``'s. Weights are read with safetensors (GGUF files
are dequantised by ``transformers`` once and cached as safetensors); pickled checkpoints are never
loaded and ``trust_remote_code`` stays off unless asked for. Nothing is fetched from a hub.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distillspec.common.runtime import resolve_device, resolve_dtype
from distillspec.decoding.kv_cache import ensure_croppable
from distillspec.models.drafts import parse_layer_spec, split_vocab_option, truncate_layers
from distillspec.models.pruned_head import load_pruned_head, prune_head
from distillspec.models.quantize import quantize_draft
from distillspec.models.recommended import resolved_quantization
from distillspec.models.registry import HUB_ID, converted_cache_path, resolve_builtin

# -- caches ------------------------------------------------------------------------------------
# cache_dir() and converted_cache_path() live in models.registry (no torch import), so that
# `distillspec models list` can report them cheaply.


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


_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def check_model_spec(spec: str | os.PathLike, allow_download: bool = False) -> None:
    """Cheap existence check of a model (or draft) spec: nothing is loaded or written."""
    base = split_vocab_option(str(spec))[0]
    if parse_layer_spec(base) is None:
        _locate(base, allow_download, check_only=True)


def _hub_snapshot(spec: str, allow_download: bool, check_only: bool = False) -> Path | None:
    """A Hub id (``org/name`` or ``org/name@revision``) from the local Hugging Face cache.

    Offline unless ``allow_download`` (and ``HF_HUB_OFFLINE`` is not set): the cache is read,
    never the network. None when ``spec`` does not look like a Hub id.
    """
    if not HUB_ID.match(spec) or Path(spec).exists():
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    repo, _, revision = spec.partition("@")
    offline = not allow_download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
    try:
        folder = snapshot_download(repo, revision=revision or None, local_files_only=offline,
                                   allow_patterns=_HUB_FILES)
    except LocalEntryNotFoundError:
        if check_only and allow_download and not offline:
            return None  # it will be downloaded when loaded
        hint = ("downloads are off (HF_HUB_OFFLINE is set)" if allow_download else
                "pass --allow-download to fetch it, or `hf download " + repo + "`")
        raise ValueError(
            f"{repo} is not in the Hugging Face cache ({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}): "
            f"{hint}."
        ) from None
    return Path(folder)


def _locate(spec: str | os.PathLike, allow_download: bool = False,
            check_only: bool = False) -> tuple[str, Path]:
    """(kind, path) for a spec: ("gguf", the GGUF file) or ("folder", the HF folder)."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        return "gguf", resolve_builtin(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    snapshot = None if path.exists() else _hub_snapshot(spec, allow_download, check_only)
    if snapshot is not None:
        path = snapshot
    elif check_only and HUB_ID.match(spec) and not path.exists():
        return "folder", path  # a Hub id that a permitted download will fetch
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a folder but has no config.json: not a Hugging Face model folder."
            )
        return "folder", path
    raise ValueError(
        f"Model {spec!r} not found: expected a Hugging Face model folder, a .gguf file, a Hub id "
        "in the local Hugging Face cache (org/name) or builtin:NAME (see `distillspec models "
        "list`). Nothing is downloaded unless you pass --allow-download."
    )


def resolve_model_path(spec: str | os.PathLike, allow_download: bool = False) -> Path:
    """A local HF folder for ``spec``: a folder, a Hub id from the HF cache, a ``.gguf`` file
    (converted) or ``builtin:NAME``."""
    kind, path = _locate(spec, allow_download)
    return convert_gguf(path) if kind == "gguf" else path


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    allow_download: bool = False,
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode on the resolved device and dtype.

    ``device_map`` (e.g. "auto") spreads a target that does not fit one device over several.
    """
    path = resolve_model_path(spec, allow_download)
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
        **({"device_map": device_map} if device_map else {}),
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, local_files_only=True
    )
    load_pruned_head(model, path)  # a pruned-vocabulary draft gets its pruned head back
    if device_map:
        return model.eval(), tokenizer
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


def build_draft(
    spec: str | os.PathLike,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    token_ids: torch.Tensor | None = None,
    allow_download: bool = False,
) -> PreTrainedModel:
    """The one way a draft is made from a spec: ``target-layers:N`` (or ``:i,j,...``) copies
    those layers of ``target``; anything else is loaded like a model and must share the
    target's tokenizer. A ``:vocab=K`` suffix prunes its head to ``token_ids`` (K ids, chosen
    by the trainer from the training data). The draft lands on the target's device, in
    ``dtype`` (default: the target's)."""
    base, vocab = split_vocab_option(str(spec))
    if vocab is not None and (token_ids is None or len(token_ids) != vocab):
        raise ValueError(
            f"Draft {spec!r} asks for a {vocab}-token head, whose tokens are chosen from the "
            "training data: use it as distill's draft_init (the trained draft then loads by "
            "path), or drop the :vocab= suffix."
        )
    dtype = dtype if dtype is not None else target.dtype
    layers = parse_layer_spec(base)
    if layers is not None:
        draft = truncate_layers(target, layers).to(resolve_dtype(dtype, target.device))
    else:
        draft, draft_tokenizer = load_model(
            base, device=target.device, dtype=dtype, trust_remote_code=trust_remote_code,
            allow_download=allow_download,
        )
        check_same_vocabulary(tokenizer, draft_tokenizer)
    if token_ids is not None:
        prune_head(draft, token_ids)
    ensure_croppable(draft)
    return draft


def load_pair(
    target: str | os.PathLike,
    draft: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    allow_download: bool = False,
    device_map: str | None = None,
    draft_quantize: str = "none",
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(target, draft, tokenizer)``; ``draft`` may be ``target-layers:N``.

    Checks that the tokenizers agree and that both caches can be rolled back.
    ``draft_quantize`` int8: the draft's weights as int8 for decoding (``models.quantize``);
    auto: as the demo measured fastest for this draft folder here (``resolved_quantization``).
    """
    target_model, tokenizer = load_model(
        target, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        allow_download=allow_download, device_map=device_map,
    )
    ensure_croppable(target_model)
    draft_model = build_draft(draft, target_model, tokenizer, trust_remote_code=trust_remote_code,
                              allow_download=allow_download)
    mode = resolved_quantization(draft_quantize, draft, target, target_model)
    return target_model, quantize_draft(draft_model, mode), tokenizer

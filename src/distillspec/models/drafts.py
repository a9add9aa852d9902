"""Draft models derived from the target: its first N decoder layers, embeddings and head."""

from __future__ import annotations

import copy
import re

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")
_VOCAB_SUFFIX = re.compile(r"^(?P<base>.+):vocab=(?P<size>\d+)$")


def split_vocab_option(spec: str) -> tuple[str, int | None]:
    """``target-layers:4:vocab=8192`` -> ("target-layers:4", 8192); no suffix -> (spec, None).

    The suffix asks for a pruned-vocabulary head over the K tokens the target emits most on the
    training data (``models.pruned_head``), so only a trainer, which has the data, can build it.
    """
    match = _VOCAB_SUFFIX.match(str(spec))
    if match is None:
        return str(spec), None
    size = int(match.group("size"))
    if size < 1:
        raise ValueError(f"Bad draft spec {spec!r}: vocab=K needs K >= 1.")
    return match.group("base"), size


def parse_layer_spec(spec: str) -> list[int] | None:
    """``target-layers:N`` -> the first N layers; ``target-layers:0,1,28,29`` -> those layers.

    Anything else -> None (the spec names a model, not a derived draft).
    """
    if not spec.startswith("target-layers:"):
        return None
    value = spec.split(":", 1)[1]
    parts = value.split(",")
    if not value or not all(p.strip().isdigit() for p in parts):
        raise ValueError(
            f"Bad draft spec {spec!r}: expected target-layers:N (the first N layers, N >= 1) or "
            "target-layers:i,j,... (those layer indices), e.g. target-layers:4 or "
            "target-layers:0,1,28,29."
        )
    numbers = [int(p) for p in parts]
    if len(numbers) == 1:
        if numbers[0] < 1:
            raise ValueError(f"Bad draft spec {spec!r}: N must be >= 1.")
        return list(range(numbers[0]))
    if sorted(set(numbers)) != numbers:
        raise ValueError(f"Bad draft spec {spec!r}: layer indices must be increasing and unique.")
    return numbers


def truncate_layers(target: PreTrainedModel, layers: int | list[int]) -> PreTrainedModel:
    """A new model with some of the target's decoder layers, its embeddings, final norm and head.

    ``layers`` is a count (the first N layers) or a list of layer indices kept in order.
    Weights are copied (not shared), so the draft can be trained without touching the target.
    """
    total = target.config.num_hidden_layers
    kept = list(range(layers)) if isinstance(layers, int) else list(layers)
    if not kept or kept[0] < 0 or kept[-1] >= total or sorted(set(kept)) != kept:
        raise ValueError(
            f"Cannot build a draft from layers {layers} of a {total}-layer target: "
            f"choose N between 1 and {total}, or increasing indices in 0..{total - 1}."
        )
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    draft = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in target.state_dict().items():
        match = _LAYER_KEY.search(key)
        if match is None:
            state[key] = value.detach().clone()
        elif int(match.group(1)) in new_index:
            renamed = f".layers.{new_index[int(match.group(1))]}."
            state[key[: match.start()] + renamed + key[match.end() :]] = value.detach().clone()
    draft.load_state_dict(state, strict=True)
    return draft.to(target.device).eval()


@torch.no_grad()
def parameter_count(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())

"""Draft models derived from the target: its first N decoder layers, embeddings and head."""

from __future__ import annotations

import copy
import re

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def parse_layer_spec(spec: str) -> int | None:
    """``"target-layers:N"`` -> N; anything else -> None."""
    if not spec.startswith("target-layers:"):
        return None
    value = spec.split(":", 1)[1]
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"Bad draft spec {spec!r}: expected target-layers:N with N a positive integer, "
            "for example target-layers:4."
        )
    return int(value)


def truncate_layers(target: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A new model with the target's first ``num_layers`` layers, embeddings, final norm and head.

    Weights are copied (not shared), so the draft can be trained without touching the target.
    """
    total = target.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(
            f"Cannot take the first {num_layers} layers of a {total}-layer target: "
            f"choose N between 1 and {total}."
        )
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    draft = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
    state = {
        key: value.detach().clone()
        for key, value in target.state_dict().items()
        if not ((m := _LAYER_KEY.search(key)) and int(m.group(1)) >= num_layers)
    }
    draft.load_state_dict(state, strict=True)
    return draft.to(target.device).eval()


@torch.no_grad()
def parameter_count(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())

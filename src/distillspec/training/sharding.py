"""Sharded training of the draft: PyTorch FSDP2 (``fully_shard``) over every process.

With ``sharding: fsdp`` each of N processes holds 1/N of the draft's trainable parameters, their
gradients and the AdamW state (ZeRO-3 style); a decoder layer's parameters are all-gathered for
its forward and backward and freed after, and gradients are reduce-scattered (averaged over
processes, as DDP does, so the loss scaling of ``training.step`` holds unchanged).

Why torch's ``fully_shard`` and not accelerate's FSDP plugin: accelerate turns FSDP on only for
accelerator devices and falls back to plain data parallelism on CPU processes, so the plugin's
path could not be tested on CPU in CI; ``fully_shard`` runs the same code on CPU (gloo) and GPUs
(nccl).

Generation (on-policy samples), evaluation and saving need the whole draft, so every process
keeps a ``Replica``: a full copy refreshed from the shards (one all-gather) when one of them
needs it. The replica costs one copy of the draft's weights per process; the gradients and
optimiser state, 3x the weights in float32 AdamW, stay sharded. The target is not sharded: it is
held frozen and whole on every process, in the inference dtype.

Checkpoints hold full (unsharded) weights and a full optimiser state, so a run resumes on any
number of processes, sharded or not.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

_FULL = StateDictOptions(full_state_dict=True)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (each one an FSDP unit), found as ``model.model.layers``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"sharding fsdp needs a decoder-only model with model.model.layers; "
            f"{type(model).__name__} has none. Use sharding none for this draft."
        )
    return list(layers)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group: each decoder layer is one unit,
    the rest (embeddings, final norm, head) the root unit. Call before building the optimiser:
    the parameters become DTensor shards."""
    if not torch.distributed.is_initialized():
        raise ValueError(
            "sharding fsdp needs a process group: launch with torchrun or accelerate launch "
            "(e.g. torchrun --nproc_per_node 2 -m distillspec distill ...)."
        )
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters in the order the optimiser was given them."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def held_numel(model: torch.nn.Module) -> int:
    """How many trainable weights this process holds: its shard's under FSDP, all otherwise."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel()
               for p in model.parameters() if p.requires_grad)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimiser state in ``optimizer.state_dict()``'s own format (parameters by
    index), as an unsharded run saves it, so either kind of run resumes from it. A collective:
    every process calls it."""
    named = get_optimizer_state_dict(model, optimizer, options=_FULL)
    index = {name: position for position, name in enumerate(trainable_names(model))}
    return {
        "state": {index[name]: value for name, value in named["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in named["param_groups"]],
    }


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """The inverse of ``full_optimizer_state``: every process takes its shard of ``state``."""
    names = trainable_names(model)
    named = {
        "state": {names[position]: value for position, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[position] for position in group["params"]]}
                         for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=named, options=_FULL)


class Replica:
    """A whole copy of a sharded draft for generation, evaluation and saving.

    ``refresh(sharded, step)`` all-gathers the shards into the copy unless it already holds that
    step's weights; every process must call it at the same steps (it is a collective).
    """

    def __init__(self, draft: torch.nn.Module) -> None:
        self.model = copy.deepcopy(draft)  # taken before sharding: plain tensors
        self.model.requires_grad_(False)
        self.step = -1

    def refresh(self, sharded: torch.nn.Module, step: int) -> torch.nn.Module:
        if step != self.step:
            full = get_model_state_dict(sharded, options=_FULL)
            with torch.no_grad():
                for name, value in self.model.state_dict().items():
                    value.copy_(full[name])
            self.step = step
        return self.model

"""Sharded training: PyTorch FSDP2 (``fully_shard``) over every process, for the draft
(``sharding: fsdp``) and for the frozen target (``target_sharding: fsdp``), each on its own.

**The draft.** With ``sharding: fsdp`` each of N processes holds 1/N of the draft's trainable
parameters, their gradients and the AdamW state (ZeRO-3 style); a decoder layer's parameters are
all-gathered for its forward and backward and freed after, and gradients are reduce-scattered
(averaged over processes, as DDP does, so the loss scaling of ``training.step`` holds unchanged).
Generation (on-policy samples), evaluation and saving need the whole draft, so every process
keeps a ``Replica``: a full copy refreshed from the shards (one all-gather) when one of them
needs it. The replica costs one copy of the draft's weights per process; the gradients and
optimiser state, 3x the weights in float32 AdamW, stay sharded.

**The target.** With ``target_sharding: fsdp`` (``shard_frozen``) the target's decoder layers
and its root (embeddings, final norm, head) are FSDP units too, each resharded after every
forward, with no gradients and no optimiser state: at rest each process holds 1/N of the
target's weights, in its inference dtype. A sharded module's forward is a collective (each unit
all-gathers its weights), so every process must run the same number of target forwards:

* the target forward of a training step (teacher logits for the step's micro-batches) runs on
  every process together, as the steps already do in lockstep;
* everything else that runs the target runs a different number of forwards per process
  (sampling stops when a batch's rows end, tau decodes on rank 0 only), so it runs inside
  ``gathered``: all units are all-gathered once (one collective), made to stay whole through
  forwards (``set_reshard_after_forward(False)``), and resharded on exit. While whole, FSDP2's
  forward hooks find the weights unsharded and issue no collective (``FSDPParamGroup.unshard``
  returns early on an unsharded group, ``reshard`` in forward returns early without
  reshard-after-forward), so each process may run any number of forwards alone. This costs a
  whole target's weights on the processes that use it, only while they do (rank 0 during a tau
  evaluation; every process while it samples live teacher answers); a process that does not
  use it frees its copy at once (``keep=False``).
* what the setup does with the target (the teacher cache, the top-k cache, building the draft
  and the evaluator's target continuations) runs before the target is sharded, so the target is
  still loaded whole on every process and the saving holds from the first training step.

Why torch's ``fully_shard`` and not accelerate's FSDP plugin: accelerate turns FSDP on only for
accelerator devices and falls back to plain data parallelism on CPU processes, so the plugin's
path could not be tested on CPU in CI; ``fully_shard`` runs the same code on CPU (gloo) and GPUs
(nccl).

Checkpoints hold full (unsharded) draft weights and a full optimiser state, so a run resumes on
any number of processes, sharded or not; the target is never saved.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

_FULL = StateDictOptions(full_state_dict=True)


def decoder_layers(model: torch.nn.Module, option: str = "sharding") -> list[torch.nn.Module]:
    """The model's decoder layers (each one an FSDP unit), found as ``model.model.layers``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{option} fsdp needs a decoder-only model with model.model.layers; "
            f"{type(model).__name__} has none. Use {option} none for this model."
        )
    return list(layers)


def _require_process_group(option: str) -> None:
    if not torch.distributed.is_initialized():
        raise ValueError(
            f"{option} fsdp needs a process group: launch with torchrun or accelerate launch "
            f"(e.g. torchrun --nproc_per_node 2 -m distillspec distill ... --{option.replace('_', '-')} "
            "fsdp)."
        )


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group: each decoder layer is one unit,
    the rest (embeddings, final norm, head) the root unit. Call before building the optimiser:
    the parameters become DTensor shards."""
    _require_process_group("sharding")
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def shard_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen model (the target) in place over the default process group: each decoder
    layer one unit, the rest the root unit, every unit (the root too) resharded after each
    forward, so between forwards each of N processes holds 1/N of every weight. No gradients,
    no optimiser state. Its forwards are collectives: every process runs them at the same
    points; a process that runs the model alone does so inside ``gathered``."""
    _require_process_group("target_sharding")
    model.requires_grad_(False)
    for layer in decoder_layers(model, "target_sharding"):
        fully_shard(layer, reshard_after_forward=True)
    # The root's default (None) keeps its weights whole after a forward, for the backward a
    # frozen model never runs; True frees them like the layers'.
    fully_shard(model, reshard_after_forward=True)
    return model


def _units(model: torch.nn.Module) -> list[FSDPModule]:
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module, keep: bool = True) -> Iterator[torch.nn.Module]:
    """Inside, ``model`` (sharded by ``shard_frozen``) is whole on this process and its forwards
    issue no collective, so each process may run any number of them on its own. Entering and
    leaving are collectives (every process, same points). ``keep=False``: this process does not
    use the model inside and frees its whole copy at once. A model that is not sharded is
    yielded as it is."""
    units = _units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()  # one all-gather per unit
    try:
        if not keep:
            for unit in units:
                unit.reshard()  # local: frees the gathered copy
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
        clear_forward_record(model)


def clear_forward_record(model: torch.nn.Module) -> None:
    """Forget the order of the forwards run so far (no-op for a model not sharded).

    FSDP2 records every unit's forward (``post_forward_order``, ``_post_forward_indices``) to
    prefetch in the backward, and clears the record only at the end of a backward; a frozen
    target never runs one, so without this the record grows by one entry per unit per forward
    for the whole run. Private attributes, read with defaults: if torch renames them this does
    nothing.
    """
    units = _units(model)
    if not units:
        return
    context = getattr(units[0]._get_fsdp_state(), "_comm_ctx", None)
    order = getattr(context, "post_forward_order", None)
    if order is not None:
        order.clear()
    for unit in units:
        for group in getattr(unit._get_fsdp_state(), "_fsdp_param_groups", ()):
            indices = getattr(group, "_post_forward_indices", None)
            if indices is not None:
                indices.clear()


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters in the order the optimiser was given them."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def held_numel(model: torch.nn.Module, trainable: bool = True) -> int:
    """How many weights this process holds (the trainable ones, or all with ``trainable=False``):
    its shards' under FSDP, all otherwise."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel()
               for p in model.parameters() if p.requires_grad or not trainable)


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

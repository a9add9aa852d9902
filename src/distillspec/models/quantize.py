"""Int8 draft weights for CPU decoding: a cheaper draft step, and SD stays lossless.

A draft step at batch 1 reads every weight once and does little arithmetic with it, so on a CPU
its time follows the bytes of its weights. Storing the draft's linear layers as int8 (one scale
per output row, PyTorch's dynamic quantization: activations are quantized on the fly per call)
halves those bytes against bf16: on the 2-core AVX-512 VM the Qwen2.5-Coder-0.5B draft's step
went from 41–45 to 24–26 ms (docs/results/bench-qwen-int8).

Only the *draft* is ever quantized. The acceptance rule reads q from the quantized draft's own
logits (the distribution it really sampled from), and the target is untouched, so greedy SD still
emits the target's greedy tokens and sampled SD the target's distribution; a slightly less
accurate draft only lowers the acceptance rate a little.

Dynamic quantization picks each call's activation scale from the whole batch, so a row's q can
depend on the rows beside it: ``--deterministic`` (which promises that a seeded request's tokens
do not) refuses it. The kernels are CPU only (fbgemm / oneDNN).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from distillspec.common.runtime import check_draft_quantize

QUANTIZED_ATTRIBUTE = "distillspec_quantized"


def draft_quantization(model: nn.Module | None) -> str:
    """How ``model``'s weights are stored: ``int8`` when ``quantize_draft`` made it, else none."""
    return getattr(model, QUANTIZED_ATTRIBUTE, "none") if model is not None else "none"


@torch.no_grad()
def quantize_draft(draft: nn.Module, mode: str) -> nn.Module:
    """``draft`` with int8 linear weights (``mode`` int8; none: unchanged), for decoding only.

    The model is converted to float32 first (the int8 kernels take float32 activations) and its
    ``nn.Linear`` layers, and a pruned head's kept rows, become dynamically quantized linears
    with per-output-channel scales. Changes the model in place and returns it.
    """
    check_draft_quantize(mode)
    if mode == "auto":  # a caller's slip: auto reads a draft folder's measurement first
        raise ValueError("quantize_draft takes int8 or none; resolve --draft-quantize auto with "
                         "models.recommended.measured_quantization first.")
    if mode == "none" or draft_quantization(draft) == mode:
        return draft
    device = next(draft.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"--draft-quantize int8 uses PyTorch's CPU int8 kernels, and the draft "
                         f"is on {device}: drop --draft-quantize (on a GPU the draft's bf16 "
                         "step is already cheap) or run on --device cpu.")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from distillspec.models.pruned_head import PrunedHead

    draft.float()
    with warnings.catch_warnings():  # torch.ao's eager quantization says it moves to torchao
        warnings.simplefilter("ignore")
        for module in draft.modules():
            if isinstance(module, PrunedHead):
                module.quantize_kept_rows(per_channel_dynamic_qconfig)
        quantize_dynamic(draft, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                         inplace=True)
    setattr(draft, QUANTIZED_ATTRIBUTE, mode)
    return draft.eval()

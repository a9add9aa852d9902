"""Reduced-vocabulary draft heads (FR-Spec / EAGLE-3's d2t idea), lossless by construction.

The draft's LM head keeps only K token ids (the ones the target emits most on the training
data). ``PrunedHead`` computes logits for those K rows and places them in a full-width row of
-inf, so q is exactly 0 on every other id: the acceptance rule needs nothing new (a token the
draft cannot propose simply is never proposed), and the verify still uses the target's full
distribution. The head matmul costs K/V of the full one.

On disk a pruned draft is a normal Hugging Face folder whose ``lm_head`` has the full vocabulary
(kept rows = the trained pruned rows, other rows = the head it started from), so transformers,
vLLM and llama.cpp load it as they are; ``pruned_head.safetensors`` (the K rows and their token
ids) sits beside it, and ``models.loading`` puts the pruned head back when it loads the folder.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

PRUNED_HEAD_FILE = "pruned_head.safetensors"


class PrunedHead(nn.Module):
    """Logits over ``token_ids`` (K rows), -inf on the other ``vocab_size - K`` ids."""

    bias = None  # no bias: read by the packed call (``x @ weight.T + bias``)

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor, base: torch.Tensor):
        super().__init__()
        token_ids = token_ids.to(torch.long)
        if token_ids.unique().numel() != token_ids.numel():
            raise ValueError("A pruned head's token ids must be distinct: each id is one row.")
        # Kept in the order given (a restricted target's logits come out in its callers' id
        # order); heads the trainer builds have ascending ids, so an argmax or top-k over the
        # kept columns breaks exact ties by the lowest id, as over the whole row.
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("token_ids", token_ids, persistent=False)
        # The full head the kept rows came from (frozen): the other rows of the saved
        # full-vocabulary head, so the folder also works in engines without pruning.
        self.register_buffer("base", base.detach().clone(), persistent=False)
        self.out_features, self.in_features = base.shape
        self.kept_only = False  # training: logits of the kept ids only (see kept_logits_only)
        self.kept_linear: nn.Module | None = None  # int8 kept rows (quantize_kept_rows)

    @property
    def PACKED_CALL(self) -> str | None:  # noqa: N802 (the name ``decoding.packed_linear`` reads)
        """The method that computes ``hidden @ weight.T``, which CPU decoding swaps for a call
        on packed weights (``decoding.packed_linear``) as it does ``forward`` of an
        nn.Linear; None once the kept rows are int8 (``kept_linear``): nothing to pack."""
        return "kept_logits" if self.kept_linear is None else None

    def kept_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., K]``: the kept rows' logits."""
        return nn.functional.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.kept_linear is not None:
            kept = self.kept_linear(hidden)
        else:
            kept = self.kept_logits(hidden)
        if self.kept_only:
            return kept
        full = kept.new_full((*kept.shape[:-1], self.out_features), float("-inf"))
        return full.index_copy(-1, self.token_ids, kept)

    @torch.no_grad()
    def quantize_kept_rows(self, qconfig) -> None:
        """Compute the kept logits with an int8 dynamically quantized copy of the kept rows
        (``models.quantize``, decoding only: the float rows stay for saving)."""
        from torch.ao.quantization import quantize_dynamic

        linear = nn.Linear(self.in_features, self.weight.shape[0], bias=False)
        linear.weight.copy_(self.weight.float())
        self.kept_linear = quantize_dynamic(nn.Sequential(linear), {nn.Linear: qconfig},
                                            dtype=torch.qint8)[0]

    def full_weight(self) -> torch.Tensor:
        """The equivalent full-vocabulary head: base rows, with the kept rows replaced."""
        weight = self.base.to(self.weight.dtype).clone()
        weight[self.token_ids] = self.weight.detach()
        return weight

    def extra_repr(self) -> str:
        return f"kept={self.weight.shape[0]}, vocab={self.out_features}, hidden={self.in_features}"


def frequent_tokens(
    sequences: Iterable[Iterable[int]], keep: int, vocab_size: int, always: Iterable[int] = ()
) -> torch.Tensor:
    """The ``keep`` most frequent ids of ``sequences`` (ties: lower id first), ``always``
    included (e.g. the EOS ids), as a sorted id tensor."""
    if not 1 <= keep <= vocab_size:
        raise ValueError(f"draft_vocab must be between 1 and the vocabulary size {vocab_size}, got {keep}.")
    counts = Counter(token for sequence in sequences for token in sequence)
    forced = [t for t in dict.fromkeys(always) if 0 <= t < vocab_size]
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    chosen = list(forced)
    for token in ranked + list(range(vocab_size)):  # pad with low ids if the data is small
        if len(chosen) >= keep:
            break
        if token not in chosen and 0 <= token < vocab_size:
            chosen.append(token)
    return torch.tensor(sorted(set(chosen[:keep])), dtype=torch.long)


def prune_head(model: nn.Module, token_ids: torch.Tensor) -> nn.Module:
    """Replace ``model``'s LM head with a PrunedHead over ``token_ids`` (in place; returned)."""
    head = model.get_output_embeddings()
    base = head.full_weight() if isinstance(head, PrunedHead) else head.weight
    token_ids = token_ids.to(base.device)
    pruned = PrunedHead(base[token_ids], token_ids, base)
    model.config.tie_word_embeddings = False  # the head is its own parameter from now on
    model.set_output_embeddings(pruned)
    return model


def is_pruned(model: nn.Module) -> bool:
    return isinstance(model.get_output_embeddings(), PrunedHead)


@contextlib.contextmanager
def full_vocabulary(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model`` has an ordinary full-vocabulary nn.Linear head (for saving/export)."""
    head = model.get_output_embeddings()
    if not isinstance(head, PrunedHead):
        yield model
        return
    linear = nn.Linear(head.in_features, head.out_features, bias=False, device=head.weight.device,
                       dtype=head.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(head.full_weight())
    model.set_output_embeddings(linear)
    try:
        yield model
    finally:
        model.set_output_embeddings(head)


@contextlib.contextmanager
def kept_logits_only(model: nn.Module) -> Iterator[torch.Tensor | None]:
    """Inside, a pruned head returns ``[..., K]`` logits of its kept ids (no -inf columns);
    yields the kept ids (None for a full head). Training compares the draft with the target's
    distribution restricted to these ids: 1/(V/K) of the loss work, and the mass outside is
    out of the draft's reach by construction."""
    head = model.get_output_embeddings()
    if not isinstance(head, PrunedHead):
        yield None
        return
    head.kept_only = True
    try:
        yield head.token_ids
    finally:
        head.kept_only = False


def _restricts(cached: PrunedHead | None, head: nn.Module, token_ids: torch.Tensor) -> bool:
    """Whether a cached restricted head still serves ``head`` for ``token_ids``: outside the
    module tree it does not follow model.to(), so dtype and device are checked too."""
    return (cached is not None and cached.weight.dtype == head.weight.dtype
            and cached.weight.device == head.weight.device
            and torch.equal(cached.token_ids, token_ids.to(cached.token_ids.device)))


@contextlib.contextmanager
def restricted_logits(model: nn.Module, token_ids: torch.Tensor | None) -> Iterator[None]:
    """Inside, a frozen model (the target) returns logits of ``token_ids`` only: its head
    matmul runs over those rows. The restricted head is built once and kept on the model, but
    outside its module tree, so the model's state_dict, parameters and drafts built from it
    after the context are what they were before (a target shared by several runs)."""
    if token_ids is None:
        yield
        return
    head = model.get_output_embeddings()
    cached = getattr(model, "_distillspec_restricted", None)
    if not _restricts(cached, head, token_ids):
        cached = PrunedHead(head.weight[token_ids], token_ids, head.weight[:1])
        cached.requires_grad_(False)
        cached.kept_only = True
        # object.__setattr__: nn.Module would register it as a submodule.
        object.__setattr__(model, "_distillspec_restricted", cached)
    model.set_output_embeddings(cached)
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def save_pruned_head(model: nn.Module, folder: Path) -> None:
    """Write ``pruned_head.safetensors`` beside a saved model (nothing for a full head)."""
    from safetensors.torch import save_file

    head = model.get_output_embeddings()
    if isinstance(head, PrunedHead):
        save_file(
            {"weight": head.weight.detach().contiguous().cpu(), "token_ids": head.token_ids.cpu()},
            str(Path(folder) / PRUNED_HEAD_FILE),
        )


def load_pruned_head(model: nn.Module, folder: Path, require_same: bool = False) -> nn.Module:
    """Put the pruned head saved in ``folder`` back on ``model`` (if there is one).

    A model that already has a pruned head over the same ids gets the weights copied in place
    (an optimiser holding that parameter keeps working); ``require_same`` refuses other ids.
    """
    path = Path(folder) / PRUNED_HEAD_FILE
    if not path.is_file():
        return model
    from safetensors.torch import load_file

    saved = load_file(str(path))
    head = model.get_output_embeddings()
    hidden = head.in_features if isinstance(head, PrunedHead) else head.weight.shape[1]
    if saved["weight"].ndim != 2 or saved["weight"].shape[1] != hidden:
        raise ValueError(f"{path} does not match the model's hidden size {hidden}.")
    same = isinstance(head, PrunedHead) and torch.equal(head.token_ids.cpu(), saved["token_ids"])
    if not same:
        if require_same:
            raise ValueError(
                f"{path} keeps other token ids than this run's draft (was the training data "
                "changed?). Resume with the same data and draft_init, or start over."
            )
        prune_head(model, saved["token_ids"])
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(saved["weight"])
    return model

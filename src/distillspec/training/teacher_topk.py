"""The target's top-k log-probabilities on fixed training data, computed once and reused.

With fixed completions (a ``datagen`` file, or ``teacher_cache``) the target's distribution at
every completion position never changes, so a step need not run the target at all: ``build``
scores every example once (batched, no_grad) and keeps, per completion token, the k most
likely ids and their log-probabilities (temperature 1), plus one ``TAIL_ID`` column holding the
exact log-mass of all the other ids. Training then uses ``divergences.sparse_divergence``: for
fkl the target renormalised over its k ids, for the others the k + 1 categories of the tail
bucket. Both approximate the full softmax (exact as k -> V); ``teacher_topk: 0`` keeps the
exact path.
For a pruned (``:vocab=K``) draft the target's head runs over the K kept ids only and the top-k
is of that restricted distribution. The cache lives in the run folder
(``teacher-topk.safetensors``), or in ``teacher_topk_dir`` named by its fingerprint, and is
rebuilt when the data, k or the kept ids change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from distillspec.common.io import atomic_write_text, atomic_writer
from distillspec.models.pruned_head import restricted_logits
from distillspec.training.batch import build_batch
from distillspec.training.divergences import TAIL_ID

TopK = tuple[torch.Tensor, torch.Tensor]  # ids [T, k] int32, log-probs [T, k] float16


def fingerprint(examples, completions: dict[str, list[int]], k: int, token_ids=None) -> str:
    """What the cache depends on: every example's prompt and completion, k and the kept ids."""
    digest = hashlib.sha256(f"{k}+tail".encode())
    if token_ids is not None:
        digest.update(json.dumps(token_ids.tolist()).encode())
    for example in examples:
        digest.update(json.dumps([example.source, example.prompt_ids,
                                  completions[example.source]]).encode())
    return digest.hexdigest()


def _topk_and_tail(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probabilities and their ids, then one ``TAIL_ID`` column holding the
    log-mass of every other id (computed here in float32, exactly: 1 - sum of the stored k would
    lose a tail below float precision, and float16 storage more)."""
    values, ids = log_probs.topk(min(k, log_probs.shape[-1]))
    rest = log_probs.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)  # -inf when k covers the vocabulary
    return (torch.cat((values, tail), dim=-1),
            torch.cat((ids, torch.full_like(ids[..., :1], TAIL_ID)), dim=-1))


@torch.inference_mode()
def build(target, examples: Sequence, completions: dict[str, list[int]], k: int, path: Path,
          *, pad_id: int = 0, batch_size: int = 32, token_ids=None) -> dict[str, TopK]:
    """Score every example with the target once; cache per-token top-k (reused when current).

    ``path`` is the cache file, or a folder that holds one file per fingerprint.
    ``token_ids`` (a pruned draft's kept ids): the target's head runs over those rows only and
    the top-k is taken of its distribution restricted to them, which is what a pruned draft is
    trained against anyway; 6x less head work on a 49k-token vocabulary with 8k kept.
    """
    from safetensors.torch import load_file, save
    from tqdm.auto import tqdm

    digest = fingerprint(examples, completions, k, token_ids)
    if path.is_dir():  # a shared folder (teacher_topk_dir): one file per fingerprint
        path = path / f"teacher-topk-{digest[:16]}.safetensors"
    if token_ids is not None:
        token_ids = token_ids.to(target.device)
    index_path = path.with_suffix(".json")
    if path.is_file() and index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("fingerprint") == digest:
            tensors = load_file(str(path))
            return {s: (tensors[f"ids.{i}"], tensors[f"logp.{i}"]) for i, s in enumerate(index["sources"])}
    result: dict[str, TopK] = {}
    with tqdm(total=len(examples), unit="prompt", desc="teacher top-k", dynamic_ncols=True) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = build_batch([e.prompt_ids for e in chunk],
                                [completions[e.source] for e in chunk], pad_id).to(target.device)
            keep = batch.scored_columns()
            with restricted_logits(target, token_ids):
                logits = target(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, logits_to_keep=keep).logits
            values, ids = _topk_and_tail(torch.log_softmax(logits.float(), dim=-1), k)
            if token_ids is not None:  # columns of the restricted head -> vocabulary ids
                ids = torch.where(ids >= 0, token_ids[ids.clamp_min(0)], ids)
            mask = batch.loss_mask[:, -keep:].bool()
            for row, example in enumerate(chunk):
                result[example.source] = (ids[row][mask[row]].int().cpu(),
                                          values[row][mask[row]].half().cpu())
            bar.update(len(chunk))
    sources = list(result)
    tensors = {}
    for i, source in enumerate(sources):
        tensors[f"ids.{i}"], tensors[f"logp.{i}"] = result[source]
    with atomic_writer(path, "wb") as handle:  # then the index that vouches for it
        handle.write(save(tensors))
    atomic_write_text(index_path, json.dumps({"fingerprint": digest, "sources": sources}))
    return result

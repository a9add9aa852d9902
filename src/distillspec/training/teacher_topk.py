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
rebuilt when the data, k or the kept ids change. Scoring goes in shards (``shards``): a killed
build keeps its finished ones (``teacher-topk.parts/``), and ranks that all call ``build``
score a share of the examples each.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from distillspec.common.io import atomic_write_text, atomic_writer
from distillspec.models.pruned_head import restricted_logits
from distillspec.training.batch import build_batch
from distillspec.training.divergences import TAIL_ID
from distillspec.training.shards import ONE_RANK, Ranks, Shards, mine, remove

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
          *, pad_id: int = 0, batch_size: int = 32, token_ids=None, ranks: Ranks = ONE_RANK,
          shard_batches: int = 16) -> dict[str, TopK]:
    """Score every example with the target once; cache per-token top-k (reused when current).

    ``path`` is the cache file, or a folder that holds one file per fingerprint (there a lock
    file makes a second run that wants the same file wait for it instead of scoring again).
    ``token_ids`` (a pruned draft's kept ids): the target's head runs over those rows only and
    the top-k is taken of its distribution restricted to them, which is what a pruned draft is
    trained against anyway; 6x less head work on a 49k-token vocabulary with 8k kept.
    Scoring goes in shards of ``shard_batches`` batches (``shards``): every rank of ``ranks``
    calls this and scores its share, the main rank merges; the cache is the same on any number
    of ranks, and a killed build redoes only unfinished shards.
    """
    digest = fingerprint(examples, completions, k, token_ids)
    shared = path.is_dir()
    if shared:  # a shared folder (teacher_topk_dir): one file per fingerprint
        path = path / f"teacher-topk-{digest[:16]}.safetensors"
    lock = path.with_name(path.name + ".lock") if shared and ranks.is_main_process else None
    with _exclusive(lock):
        ranks.wait_for_everyone()  # the main rank holds the lock: the cache cannot change now
        found = _load_current(path, digest)
        if found is not None:
            return found
        if token_ids is not None:
            token_ids = token_ids.to(target.device)
        shards = Shards(path.with_name(path.stem + ".parts"), len(examples),
                        shard_batches * batch_size, "safetensors")
        _score_shards(target, examples, completions, k, shards, digest, ranks,
                      pad_id=pad_id, batch_size=batch_size, token_ids=token_ids)
        ranks.wait_for_everyone()  # every shard written before the main rank merges them
        result = _merge(shards, examples, path, digest) if ranks.is_main_process else None
        ranks.wait_for_everyone()
        return result if result is not None else _load_current(path, digest)


@contextlib.contextmanager
def _exclusive(lock: Path | None) -> Iterator[None]:
    """An exclusive lock on ``lock`` (a file beside the cache) while inside; None: no lock."""
    if lock is None:
        yield
        return
    import fcntl

    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_current(path: Path, digest: str) -> dict[str, TopK] | None:
    """The cache at ``path`` when its index vouches for ``digest``, else None."""
    from safetensors.torch import load_file

    index_path = path.with_suffix(".json")
    if not (path.is_file() and index_path.is_file()):
        return None
    index = json.loads(index_path.read_text())
    if index.get("fingerprint") != digest:
        return None
    tensors = load_file(str(path))
    return {s: (tensors[f"ids.{i}"], tensors[f"logp.{i}"]) for i, s in enumerate(index["sources"])}


def _score_shards(target, examples, completions, k, shards: Shards, digest: str, ranks: Ranks,
                  *, pad_id, batch_size, token_ids) -> None:
    """This rank's unfinished shards, each scored batch by batch and written as it ends."""
    from safetensors.torch import save
    from tqdm.auto import tqdm

    todo, _ = mine(shards, digest, ranks, replace=True)
    total = sum(shards.bounds(i)[1] - shards.bounds(i)[0] for i in todo)
    with tqdm(total=total, unit="prompt", desc="teacher top-k", dynamic_ncols=True,
              disable=not ranks.is_main_process) as bar:
        for index in todo:
            start, stop = shards.bounds(index)
            scored = []
            for first in range(start, stop, batch_size):
                chunk = examples[first : min(first + batch_size, stop)]
                scored += _score(target, chunk, completions, k, pad_id, token_ids)
                bar.update(len(chunk))
            tensors = {}
            for i, (ids, values) in enumerate(scored):
                tensors[f"ids.{i}"], tensors[f"logp.{i}"] = ids, values
            shards.write(index, save(tensors))


def _score(target, chunk, completions, k, pad_id, token_ids) -> list[TopK]:
    """One batch: every example's (ids, log-probs) at its completion positions, in order."""
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
    return [(ids[row][mask[row]].int().cpu(), values[row][mask[row]].half().cpu())
            for row in range(len(chunk))]


def _merge(shards: Shards, examples: Sequence, path: Path, digest: str) -> dict[str, TopK]:
    """The shards in order, written as the cache file, then the index that vouches for it;
    the shards are removed."""
    from safetensors.torch import load_file, save

    result: dict[str, TopK] = {}
    for index, shard in enumerate(shards.paths()):
        tensors = load_file(str(shard))
        start, stop = shards.bounds(index)
        for i, example in enumerate(examples[start:stop]):
            result[example.source] = (tensors[f"ids.{i}"], tensors[f"logp.{i}"])
    sources = list(result)
    tensors = {}
    for i, source in enumerate(sources):
        tensors[f"ids.{i}"], tensors[f"logp.{i}"] = result[source]
    with atomic_writer(path, "wb") as handle:
        handle.write(save(tensors))
    atomic_write_text(path.with_suffix(".json"), json.dumps({"fingerprint": digest,
                                                            "sources": sources}))
    remove(shards)
    return result

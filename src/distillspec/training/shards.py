"""Teacher data split across ranks: fixed-size shards, one file each, merged in order.

A job over N items (prompts to answer, examples to score) is cut into contiguous shards of
``size`` items. The cut does not depend on the number of ranks, so every shard holds the same
bytes whoever computes it, and a merged result equals a 1-rank run's. Shard j is written
atomically to ``<parts>/shard-<j>.<suffix>`` by the rank that owns it; the shards without a file
are dealt round-robin over the ranks, so a killed run redoes only its unfinished shards (on any
number of ranks). ``<parts>/manifest.json`` holds the job's fingerprint: a parts folder of
another job is refused, or cleared with ``replace=True`` (only the files a job wrote there).

``ranks`` is anything with ``process_index``, ``num_processes``, ``is_main_process`` and
``wait_for_everyone()``: accelerate's ``PartialState`` / ``Accelerator`` under ``torchrun`` or
``accelerate launch``, or ``ONE_RANK``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from distillspec.common.io import atomic_write_json, atomic_writer, is_temporary

MANIFEST = "manifest.json"


class Ranks(Protocol):
    process_index: int
    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


@dataclass(frozen=True)
class _OneRank:
    """A single process: no one to wait for."""

    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        return None


ONE_RANK = _OneRank()


@dataclass(frozen=True)
class Shards:
    """``total`` items cut into shards of ``size``, kept in ``folder`` (a parts folder)."""

    folder: Path
    total: int
    size: int
    suffix: str

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"A shard must hold at least one item, got size {self.size!r}.")

    @property
    def count(self) -> int:
        return math.ceil(self.total / self.size)

    def bounds(self, index: int) -> tuple[int, int]:
        """Items [start, stop) of shard ``index``."""
        start = index * self.size
        return start, min(start + self.size, self.total)

    def path(self, index: int) -> Path:
        return self.folder / f"shard-{index:06d}.{self.suffix}"

    def write(self, index: int, data: bytes) -> None:
        with atomic_writer(self.path(index), "wb") as handle:
            handle.write(data)

    def paths(self) -> list[Path]:
        return [self.path(index) for index in range(self.count)]


def mine(shards: Shards, fingerprint: str, ranks: Ranks, *,
         replace: bool = False) -> tuple[list[int], int]:
    """The unfinished shards this rank computes (in order) and how many were finished before.
    The main rank opens the parts folder first; every rank lists the finished shards before
    any rank writes one, so all ranks deal the same list."""
    if ranks.is_main_process:
        _open(shards, fingerprint, replace)
    ranks.wait_for_everyone()
    pending = [index for index in range(shards.count) if not shards.path(index).is_file()]
    ranks.wait_for_everyone()
    return pending[ranks.process_index :: ranks.num_processes], shards.count - len(pending)


def _open(shards: Shards, fingerprint: str, replace: bool) -> None:
    folder = shards.folder
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"{folder} is a link or a file; distillspec keeps its shards in a folder "
                         "it creates there. Move it away or choose another output path.")
    wanted = {"fingerprint": fingerprint, "total": shards.total, "size": shards.size}
    if folder.is_dir() and any(folder.iterdir()):
        saved = _manifest(folder)
        if saved == wanted:
            return  # an earlier run of this job: its finished shards are kept
        if not replace:
            raise ValueError(
                f"{folder} holds the shards of another job (other inputs, model or settings), "
                "kept to resume it. Rerun that job to finish it, pass --overwrite to discard its "
                "shards, or choose another output path."
            )
        remove(shards)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / MANIFEST, wanted)


def _manifest(folder: Path) -> dict:
    try:
        saved = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if isinstance(saved, dict):
            return saved
    except (OSError, ValueError):
        pass
    raise ValueError(
        f"{folder} exists but is not a shard folder distillspec wrote (no readable {MANIFEST}), "
        "so it is left alone. Move it away or choose another output path."
    )


def remove(shards: Shards) -> None:
    """Delete what a job wrote in the parts folder (its shards, their temporary files, the
    manifest), then the folder if nothing else is left in it."""
    folder = shards.folder
    if folder.is_symlink() or not folder.is_dir():
        return
    for entry in folder.iterdir():
        ours = entry.name == MANIFEST or entry.name.startswith("shard-") or (
            is_temporary(entry) and (".shard-" in entry.name or f".{MANIFEST}." in entry.name))
        if ours and entry.is_file() and not entry.is_symlink():
            entry.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()

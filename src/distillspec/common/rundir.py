"""Output folders are ours or refused: a marker file records what a run created.

``claim(folder, kind)`` is called after every input was validated and before anything is
written. It accepts a missing or empty folder, or one that holds the marker of a run of the
same kind, and refuses anything else (a folder with other files, another command's run, a
marker we cannot read) without touching it. ``fresh=True`` removes only the entries the marker
lists, i.e. what our runs created there, and never follows a symbolic link. Every top-level
entry a run writes is recorded first with ``RunFolder.track``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from distillspec.common.io import atomic_write_json

MARKER = ".distillspec-run.json"


@dataclass
class RunFolder:
    """An output folder this program owns, and the top-level entries its runs created."""

    path: Path
    kind: str
    entries: list[str] = field(default_factory=list)

    def track(self, *names: str) -> None:
        """Record top-level entries before writing them (so --fresh can remove exactly them)."""
        new = [n for n in names if n not in self.entries]
        if new:
            self.entries += new
            self._write_marker()

    def child(self, name: str) -> Path:
        """``path/name``, tracked, and refused if it is a symbolic link (no writes through it)."""
        self.track(name.split("/")[0])
        target = self.path / name
        if target.is_symlink():
            raise ValueError(
                f"{target} is a symbolic link; distillspec writes only inside its own output "
                "folder and never through a link. Remove the link or choose another folder."
            )
        return target

    def refuse_links(self, *names: str) -> None:
        """Refuse to run at all when any of these entries is a symbolic link."""
        for name in names:
            if (self.path / name).is_symlink():
                self.child(name)  # raises with the message

    def _write_marker(self) -> None:
        atomic_write_json(
            self.path / MARKER,
            {"kind": self.kind, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "entries": self.entries},
        )


def _read_marker(folder: Path) -> dict | None:
    marker = folder / MARKER
    if not marker.exists():
        return None
    if marker.is_symlink() or not marker.is_file():
        raise ValueError(f"{marker} is not a regular file; refusing to use {folder}.")
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise ValueError
        return data
    except ValueError:
        raise ValueError(
            f"{marker} is damaged, so distillspec cannot tell which files in {folder} are its "
            "own. Choose another output folder, or remove the marker if the folder is yours."
        ) from None


def check_writable(folder: Path) -> None:
    """The folder (or its nearest existing parent) must be a writable directory."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; the output must be a folder.")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"Cannot create {folder}: {probe} is a file, not a folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot write to {probe}: permission denied. Choose another folder.")


def claim(folder: str | Path, kind: str, *, fresh: bool = False) -> RunFolder:
    """Take ``folder`` for a run of ``kind`` (see the module docstring); returns its RunFolder."""
    folder = Path(folder)
    check_writable(folder)
    marker = _read_marker(folder) if folder.is_dir() else None
    if marker is None:
        others = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        if others:
            shown = ", ".join(sorted(others)[:5]) + (", ..." if len(others) > 5 else "")
            raise ValueError(
                f"{folder} is not empty ({shown}) and is not a distillspec {kind} folder. "
                "distillspec writes only into new or empty folders or into its own runs, so "
                "nothing of yours is overwritten. Choose another output folder."
            )
        folder.mkdir(parents=True, exist_ok=True)
        run = RunFolder(folder, kind)
        run._write_marker()
        return run
    if marker.get("kind") != kind:
        raise ValueError(
            f"{folder} holds a distillspec {marker.get('kind')!r} run, not a {kind} run. "
            "Choose another output folder."
        )
    run = RunFolder(folder, kind, [str(e) for e in marker["entries"]])
    if fresh:
        remove_entries(run)
    return run


def remove_entries(run: RunFolder) -> None:
    """Delete what the marker lists (links are unlinked, never followed), keep everything else."""
    for name in run.entries:
        if "/" in name or name in ("", ".", "..", MARKER):
            continue
        target = run.path / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
    run.entries = []
    run._write_marker()

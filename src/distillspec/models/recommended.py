"""The speculation setting a draft was measured fastest at, saved inside the draft's folder.

``distillspec demo`` measures its distilled draft at several (gamma, threshold) settings side by
side with the target alone, together with the machine's cost model (draft step, verify curve).
It writes the fastest setting and that cost model to ``FILE`` in the draft folder, tagged with
the machine kind (CPU model and threads, or GPU name) and dtype it was measured on. ``generate``
and ``serve`` use it when the user left gamma and the threshold at their defaults and runs on
the same kind of machine: a speed figure measured elsewhere says nothing here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillspec.common.io import atomic_write_json
from distillspec.common.runtime import machine_kind

FILE = "distillspec_speculation.json"


def save_recommended(
    folder: Path,
    *,
    gamma: int,
    confidence_threshold: float,
    device,
    dtype,
    measured: dict[str, Any],
) -> Path:
    """Write the fastest measured setting (and what it was measured with) to ``folder/FILE``."""
    path = Path(folder) / FILE
    atomic_write_json(path, {
        "gamma": int(gamma),
        "confidence_threshold": float(confidence_threshold),
        "machine": machine_kind(device),
        "dtype": str(dtype),
        "measured": measured,
    })
    return path


def recommended_for(folder: Path | str, device, dtype) -> dict[str, Any] | None:
    """The saved setting of a draft folder if it was measured on this machine kind and dtype."""
    path = Path(folder) / FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    if saved.get("machine") != machine_kind(device) or saved.get("dtype") != str(dtype):
        return None
    gamma, threshold = saved.get("gamma"), saved.get("confidence_threshold")
    if not isinstance(gamma, int) or not isinstance(threshold, int | float):
        return None
    return saved

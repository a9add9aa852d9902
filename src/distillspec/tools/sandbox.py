"""Run untrusted Python (a generated completion with its unit tests) in a confined child process.

``run_python(source, limits)`` writes ``source`` into a fresh temporary folder and runs it there
through ``sandbox_boot.py`` (namespaces, rlimits and an audit hook, applied inside the child
before the program starts; see that module) with:

* a clean environment (``HOME`` and ``TMPDIR`` = the folder, ``PATH=/usr/bin:/bin``, one BLAS
  thread), no standard input, and ``python -I -B`` (no user site, no ``PYTHON*`` variables, no
  bytecode written);
* its own session and process group (``start_new_session``); the parent waits for it without
  reaping it, then kills the whole group with SIGKILL (on timeout, and afterwards, for anything
  it left behind) before reaping, so the group id cannot have been reused by then;
* a wall-clock timeout, a CPU limit of ``ceil(timeout)`` seconds per process and a memory
  (address-space) limit per process.

What it does not do: the program runs as the calling user, with that user's file permissions
(the audit hook's write guard sees Python code, not native code); outside a PID namespace a
process that leaves the group (``setsid``) survives the kill; the memory limit is per process
(a program's processes together can use up to ``max_processes`` times it). Run
``distillspec eval`` as an unprivileged user, in a container or VM, for code you do not trust.
``Execution.isolation`` says what applied on this machine (docs/eval.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

BOOT = Path(__file__).with_name("sandbox_boot.py")
STATUSES = ("passed", "failed", "timeout", "memory", "cpu", "killed")
OUTPUT_TAIL = 2000  # characters of the program's output kept for the report


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits; every one is enforced by the kernel or the child's guard, not by trust."""

    timeout_s: float = 5.0  # wall clock; the CPU limit is ceil(timeout_s) per process
    memory_mb: int = 1024  # address space per process
    max_processes: int = 16  # processes the program may have (forks, for root)
    max_file_mb: int = 16  # largest file it may write (its output included)
    max_open_files: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s <= 3600):
            raise ValueError(f"sandbox timeout must be in (0, 3600] seconds, got {self.timeout_s!r}.")
        for name, low in (("memory_mb", 64), ("max_processes", 1), ("max_file_mb", 1),
                          ("max_open_files", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"sandbox {name} must be an integer >= {low}, got {value!r}.")

    @property
    def cpu_s(self) -> int:
        return max(1, math.ceil(self.timeout_s))

    def for_child(self) -> str:
        return json.dumps({**asdict(self), "cpu_s": self.cpu_s})


@dataclass
class Execution:
    """The outcome of one sandboxed run."""

    status: str  # one of STATUSES; only "passed" is a pass
    returncode: int | None  # the child's (>= 128: killed by signal returncode - 128)
    wall_s: float
    output: str = ""  # the tail of stdout + stderr
    isolation: dict = field(default_factory=dict)  # what applied (sandbox_boot's report)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def detail(self) -> str:
        """One line: the last line of the output (e.g. the exception), or the status."""
        lines = [line for line in self.output.strip().splitlines() if line.strip()]
        return lines[-1][:300] if lines else self.status


def _environment(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _exited(pid: int) -> bool:
    """Has the child exited? Never reaps it (WNOWAIT), so its pid and group id stay taken."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until the child exits (True) or the deadline passes (False), without reaping it."""
    pause = 0.002
    while not _exited(pid):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.02)
    return True


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _classify(timed_out: bool, returncode: int, output: str) -> str:
    """The status of a run; ``returncode`` >= 128 means killed by signal returncode - 128."""
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    lines = output.strip().splitlines()
    if lines and lines[-1].startswith("MemoryError"):
        return "memory"
    if returncode == 128 + signal.SIGXCPU:
        return "cpu"
    return "killed" if returncode > 128 else "failed"


def run_python(source: str, limits: SandboxLimits | None = None) -> Execution:
    """Run ``source`` as ``__main__`` in the sandbox (see the module docstring); a program that
    exits 0 passes, anything else (exception, failed assertion, limit, timeout) fails."""
    limits = limits or SandboxLimits()
    workdir = tempfile.mkdtemp(prefix="distillspec-sandbox-")
    try:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        output_path = Path(workdir, "output.txt")
        with open(output_path, "wb") as output:
            started = time.monotonic()
            child = subprocess.Popen(
                [sys.executable, "-I", "-B", str(BOOT), limits.for_child(), "program.py"],
                cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )
            try:
                finished = _wait_unreaped(child.pid, started + limits.timeout_s)
            finally:
                _kill_group(child.pid)  # the child is unreaped: its group id cannot be reused
                child.wait()
            wall = time.monotonic() - started
        text = _tail(output_path)
        returncode = child.returncode if child.returncode >= 0 else 128 - child.returncode
        status = _classify(not finished, returncode, text)
        return Execution(status, returncode, wall, text, _isolation(Path(workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4 * OUTPUT_TAIL))
            return handle.read().decode("utf-8", "replace")[-OUTPUT_TAIL:]
    except OSError:
        return ""


def _isolation(workdir: Path) -> dict:
    try:
        report = json.loads((workdir / "isolation.json").read_text())
        return report if isinstance(report, dict) else {}
    except (OSError, ValueError):
        return {}


def run_many(sources: Sequence[str], limits: SandboxLimits | None = None,
             workers: int = 1) -> list[Execution]:
    """``run_python`` for each source, ``workers`` at a time; results in input order."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")
    if workers == 1:
        return [run_python(source, limits) for source in sources]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_python(source, limits), sources))


def check_sandbox(limits: SandboxLimits | None = None) -> dict:
    """Run a trivial program; returns what isolation applied, or raises when nothing runs."""
    result = run_python("print('ok')\n", limits)
    if not result.passed or "ok" not in result.output:
        raise ValueError(
            f"The code sandbox cannot run a trivial program here ({result.status}: "
            f"{result.detail}). It starts `{sys.executable} -I -B {BOOT}`; check that this "
            "interpreter runs and that the system temporary folder is writable."
        )
    return result.isolation

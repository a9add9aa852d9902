"""Where and in which precision models run: the one device, dtype and threads policy.

``RuntimeConfig`` is nested in every command's config (its flags have no prefix: ``--device``,
``--dtype``, ``--threads``). ``resolve_device`` / ``resolve_dtype`` / ``apply_threads`` are the
only places that decide; ``autocast_bf16`` is the training side of the same dtype rule.
torch is imported inside the functions so that building a config (and ``--help``) stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from distillspec.common.config import knob

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DRAFT_QUANTIZE_CHOICES = ("auto", "none", "int8")  # how a draft's weights are stored (models/quantize.py)
MAX_THREADS = 1024


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and in which precision models run."""

    device: str = knob("auto", "Device: auto (CUDA when present), cpu, cuda, cuda:N.")
    dtype: str = knob(
        "auto",
        "Weights dtype: auto (bf16 on CUDA and on CPUs with native bf16, else float32).",
        choices=DTYPE_CHOICES,
    )
    threads: int = knob(0, "CPU threads for torch (0: torch's default, one per core).")
    trust_remote_code: bool = knob(
        False, "Allow model repositories to run their own Python code (off by default)."
    )
    allow_download: bool = knob(
        False,
        "Let a Hub id (org/name) that is not in the local Hugging Face cache be downloaded "
        "(off: only the cache is read; HF_HUB_OFFLINE=1 always wins).",
    )
    device_map: str = knob(
        "", "Spread a model over several devices (transformers' device_map, e.g. auto); empty: one device."
    )
    deterministic: bool = knob(
        False,
        "Deterministic decoding: float32 weights and arithmetic, so a greedy or seeded request "
        "gives the same tokens whatever shares its batch and whatever gamma or tree verifies it "
        "(in bf16/fp16 near-tied logits can flip). Costs what float32 costs against bf16 on "
        "this machine (nothing where auto already picks float32); refuses --dtype "
        "bfloat16/float16.",
    )

    draft_quantize: str = knob(
        "auto",
        "Draft weights when decoding with a draft (generate, serve, bench, eval): int8 (CPU "
        "only: the draft's linear layers as int8 with one scale per row; SD stays lossless, as "
        "the rule uses the int8 draft's own q, and acceptance drops a little), none (as "
        "loaded), or auto: int8 where `distillspec demo` measured this draft faster with int8 "
        "weights on this machine kind and dtype (it measures both on a CPU), else none. int8 "
        "is refused by the commands that train or have no draft, and with --deterministic.",
        choices=DRAFT_QUANTIZE_CHOICES,
    )

    def __post_init__(self) -> None:
        check_draft_quantize(self.draft_quantize)
        if self.deterministic and self.draft_quantize == "int8":
            raise ValueError(
                "--deterministic promises a seeded request the same tokens whatever shares its "
                "batch, and an int8 draft's activation scales depend on the whole batch: drop "
                "--draft-quantize or --deterministic."
            )
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be between 0 and {MAX_THREADS}, got {self.threads}.")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(
                f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}."
            )
        if self.deterministic and self.dtype not in ("auto", "float32"):
            raise ValueError(
                f"--deterministic runs in float32, but --dtype {self.dtype} was given: drop "
                "--dtype (or pass float32), or drop --deterministic to keep the faster dtype."
            )

    @property
    def model_dtype(self) -> str:
        """The dtype models are loaded in: float32 under --deterministic, else --dtype."""
        return "float32" if self.deterministic else self.dtype


def load_options(runtime: RuntimeConfig) -> dict:
    """The keyword arguments ``models.loading.load_model`` takes from the runtime settings."""
    return dict(device=runtime.device, dtype=runtime.model_dtype,
                trust_remote_code=runtime.trust_remote_code,
                allow_download=runtime.allow_download, device_map=runtime.device_map or None)


def check_draft_quantize(mode: str) -> None:
    if mode not in DRAFT_QUANTIZE_CHOICES:
        raise ValueError(f"draft quantization must be one of {', '.join(DRAFT_QUANTIZE_CHOICES)}, "
                         f"got {mode!r}.")


def refuse_draft_quantize(runtime: RuntimeConfig, command: str) -> None:
    """``--draft-quantize int8`` acts where a draft decodes (generate, serve, bench, eval):
    refused by the commands that would silently ignore it (auto decides nothing there)."""
    if runtime.draft_quantize == "int8":
        raise ValueError(
            f"--draft-quantize {runtime.draft_quantize} stores a draft's weights for decoding "
            f"(generate, serve, bench, eval), and {command} has no such draft: drop the flag."
        )


def draft_weights_option(runtime: RuntimeConfig) -> str:
    """``--draft-quantize`` as a decoding draft is loaded with: none under --deterministic
    (which promises batch-independent tokens, and an int8 draft cannot keep that), else as
    given (auto still to be resolved per draft folder: ``recommended.resolved_quantization``)."""
    return "none" if runtime.deterministic else runtime.draft_quantize


def pair_options(runtime: RuntimeConfig) -> dict:
    """``load_options`` plus the draft's weights, for ``models.loading.load_pair``."""
    return {**load_options(runtime), "draft_quantize": draft_weights_option(runtime)}


def apply_threads(runtime: RuntimeConfig) -> None:
    """Set torch's intra-op thread count when the user asked for one; under --deterministic,
    also torch's deterministic algorithms and no TF32 (a CUDA matmul in TF32 rounds like bf16).
    Every command calls it first: it also keeps freed CPU memory for reuse
    (``keep_freed_memory``)."""
    import torch

    keep_freed_memory()
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    if runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


# glibc's mallopt parameters (malloc.h) and the values set: blocks up to the largest threshold
# glibc accepts on 64-bit (32 MiB) come from the heap, and up to 512 MiB of free memory at its
# top stays there.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 32 << 20, 512 << 20


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed large blocks instead of handing them back to the OS;
    returns whether it applied (glibc only; elsewhere nothing happens).

    Why: torch's CPU tensors come from malloc, and by default glibc serves a block above its
    mmap threshold (128 KiB at start, moved as blocks are freed) with fresh pages from the OS
    and returns it on free, or trims freed memory off the heap's top, so a decoding step's
    large temporaries (the float32 probabilities of a sampled block: 8 rows x 5
    positions x a 49k vocabulary are 7.9 MB) page-fault on every touch, every step. On the
    2-core Xeon, warping 8 rows' 5-position tree block took 6.4 ms that way and 1.2 ms with
    the memory kept, and a sampled 8-row tree step of the demo's pair 71 against 65 ms. The
    cost is the process keeping the memory of its largest step for reuse, which an inference
    process needs again at its next step anyway. Blocks above 32 MiB (a training batch's
    logits) still come from the OS."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (not musl's libc.so.6)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


# GNU OpenMP only (torch's Linux wheels), where it was tried: its hard pause freed the calling
# thread's team. The standard lets a hard pause free every thread's resources, which another
# runtime might do while a thread computes.
OPENMP_LIBRARIES = ("libgomp",)
OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free the threads, not only put them to sleep


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP worker threads (OpenMP 5.0's
    ``omp_pause_resource_all(omp_pause_hard)``); returns whether a runtime did.

    Call it in a thread that has run parallel torch work (loading, warming up) before another
    thread takes the work over, as the server's engine thread does. Why: each thread that starts
    parallel regions keeps its own team of workers, and once the process's OpenMP threads
    outnumber its CPUs GNU OpenMP stops letting idle workers spin (they sleep and must be woken
    for every region). On a 2-core CPU a 16-row decoding step in the engine thread took 77 ms
    at 114 % CPU, against 52 ms at 199 % with the loading thread's team freed, as in the main
    thread (docs/results/openmp-threads). The next parallel region of the calling thread starts
    a new team. GNU OpenMP on Linux only (found in /proc/self/maps); elsewhere, and where the
    runtime lacks the call, nothing happens."""
    import ctypes

    released = False
    for path in _loaded_openmp_libraries():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        released = pause(OMP_PAUSE_HARD) == 0 or released
    return released


def _loaded_openmp_libraries() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; else none)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    return sorted(p for p in paths if Path(p).name.startswith(OPENMP_LIBRARIES))


def resolve_device(device: Any = "auto"):
    """``auto`` -> CUDA when present, else CPU; a CUDA request without CUDA is an error."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"Device {device!r} was requested but CUDA is not available here; use cpu or auto."
        )
    return resolved


@cache
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_kind(device) -> str:
    """What a speed measurement is only valid on: the GPU's name, or the CPU's and its threads."""
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_name()}:{torch.get_num_threads()} threads"


@cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX (bf16 matmuls there are ~2.5x faster than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: Any = "auto", device=None):
    """``auto`` -> bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with native bf16,
    else float32. A ``torch.dtype`` passes through."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in names:
            raise ValueError(f"Unknown dtype {dtype!r}; choose auto, {', '.join(names)}.")
        return names[dtype]
    device = device if device is not None else resolve_device("auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def autocast_bf16(setting: str, device) -> bool:
    """Training's autocast rule: ``auto`` follows ``resolve_dtype`` (bf16 where it is native)."""
    import torch

    if setting != "auto":
        return setting == "on"
    return resolve_dtype("auto", device) == torch.bfloat16

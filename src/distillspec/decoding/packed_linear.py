"""Linear layers on pre-packed weights for CPU decoding steps (oneDNN's blocked layout).

On the CPU, ``torch.nn.functional.linear`` hands a plain row-major weight to oneDNN, which
reorders it into its blocked layout on every call. A decoding step multiplies one or a few
tokens by every weight matrix, so that reorder is about half of each matmul's time (measured on
SmolLM2-135M in bf16: 65 µs -> 34 µs for a 576x1536 projection; the whole step 38.5 -> 26.9 ms).
``packed_linears(model)`` runs a model's ``nn.Linear`` layers, and any module that names its
``x @ weight.T`` method in ``PACKED_CALL`` (a pruned draft head's kept rows: the demo draft's
one-token step, 3.4 ms in bf16, is 0.3 ms shorter with its 8192x576 head packed), on weights
packed once (``torch.ops.mkldnn._reorder_linear_weight``) and kept beside the model: one extra copy of its
linear weights, shared by the eager and the compiled steps (``torch.compile`` sees the
``distillspec::packed_linear`` operator and leaves it to oneDNN).

Calls of a few rows (a verify block, a small batch) are another matter in float32 on some
CPUs: on a 2-core AVX2 EPYC, oneDNN's float32 kernel took 145 µs for 2 rows and 212 µs for 4 of
a 576x1536 projection against 75 µs for 1, where MKL's ``torch.mm(weight, x.T)`` (the weight
as the tall left operand) took 108 and 135. So each float32 call of 2..TUNED_MAX_ROWS rows
times both once per weight shape, row count and thread count, and keeps the weight-major call
where it ran at least 10 % faster (never under torch's deterministic algorithms, where a
timing must not decide the arithmetic). One-row calls and bf16 stay packed, and so do calls of
more than TUNED_MAX_MACS multiply-adds: there the weight-major call lost (SmolLM2's 49152x576
head: 0.85x the packed time at 4 rows, 1.18-1.38x at 8-32; a 8960x1536 projection 1.08-1.28x
at 8-32), while timing it cost ~0.4 s per row count, paid inside whatever step first used that
width. ``warm_choices(model)`` pays every timing up front (the server does, at start).

The same kernels compute the same sums: in bf16 the outputs are bit for bit those of
``F.linear`` (tested); in float32 they differ in the last bits, as ``F.linear``'s own do
between a 1-row and a 4-row call. A weight changed in place (training, ``load_state_dict``)
bumps its version counter and is packed again at its next use. Two kinds of update bump no
counter, and are caught otherwise: any ``torch.optim`` step (fused AdamW writes in place without
one) drops its parameters' packed copies through a global step hook, and a write through
``.data`` moves the weight's fingerprint (a sum over every 257th element), which every
``CachedModel`` (each generate call, each ``Decoder``) checks when it is made. Only an edit
through ``.data`` that leaves every sampled element unchanged, made while a ``Decoder`` runs or
between two calls, goes unseen: call ``refresh(model)`` after such an edit, or switch packing
off. Packing is skipped where it cannot pay or cannot run: gradients enabled (training),
devices other than the CPU, weights made under ``torch.inference_mode`` (no version
counter to watch), dtypes other than bf16/float32 (bf16 only where oneDNN has bf16
kernels), a model whose packed copy would take more than half the memory still available, or
``DISTILLSPEC_PACKED_LINEARS=0`` (1 or unset: on; any other value is refused). The decision is
taken again when the weights move to another device or dtype.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from distillspec.decoding.timing import interleaved_medians

FINGERPRINT_STRIDE = 257  # elements; a prime, so it walks across the rows of any matrix
MEMORY_SHARE = 0.5  # a packed copy may take at most this share of the memory still available
ENV_SWITCH = "DISTILLSPEC_PACKED_LINEARS"
TUNED_MAX_ROWS = 64  # widest call whose kernel is chosen by timing (verify blocks, batches)
TUNED_MAX_MACS = 1 << 27  # rows x out x in; a call this big is compute-bound: packed, untimed
WEIGHT_MAJOR_MARGIN = 0.9  # the weight-major call must time 10 % faster to be chosen
TUNING_REPS = 7  # timed calls of each kernel, alternating


class _Packed:
    """One weight's packed copy, valid while the weight keeps its storage and version."""

    def __init__(self, weight: torch.Tensor, fingerprint: float | None = None):
        self.weight = weakref.ref(weight)
        self.key = _weight_key(weight)
        self.fingerprint = _fingerprint(weight) if fingerprint is None else fingerprint
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _fingerprint(weight: torch.Tensor) -> float:
    """A sum over every ``FINGERPRINT_STRIDE``-th element: any optimiser step moves it, and it
    reads ~1 % of the weight (a full repack at every decoding call would cost ~2 steps)."""
    return weight.detach().reshape(-1)[::FINGERPRINT_STRIDE].sum(dtype=torch.float64).item()


def _weight_key(weight: torch.Tensor) -> tuple[int, int]:
    # a new storage (``.data =``, ``.to``) moves the pointer; an in-place write bumps the version
    return weight.data_ptr(), weight._version


_by_storage: dict[int, _Packed] = {}


def _pack(weight: torch.Tensor, fingerprint: float | None = None) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        entry = _Packed(weight, fingerprint)
    if weight.data_ptr() not in _by_storage:  # forget the copy with the weight
        weakref.finalize(weight, _by_storage.pop, weight.data_ptr(), None)
    _by_storage[weight.data_ptr()] = entry
    return entry.packed


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The packed copy of ``weight``, packed again if the weight changed since."""
    key = _weight_key(weight)
    entry = _by_storage.get(key[0])
    if entry is None or entry.key != key or entry.weight() is None:
        return _pack(weight)
    return entry.packed


def refresh(model: torch.nn.Module) -> None:
    """Pack again each of ``model``'s weights whose fingerprint moved (``CachedModel`` calls
    this when it is made): writes through ``.data`` bump no version counter."""
    for module, _, _ in _swaps_for(model):
        weight = module.weight
        entry, fingerprint = _by_storage.get(weight.data_ptr()), _fingerprint(weight)
        if entry is None or entry.fingerprint != fingerprint:
            _pack(weight, fingerprint)


def _forget_stepped(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimiser step, its parameters' packed copies are stale: PyTorch's fused
    AdamW writes them in place without bumping their version counters."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            _by_storage.pop(parameter.data_ptr(), None)


register_optimizer_step_post_hook(_forget_stepped)


def _packed_call(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(weight), bias, "none", [], "")


def _weight_major_call(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``(weight @ x.T).T``: the same product with the weight as the tall left operand."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, rows.t()).t().contiguous()  # a few rows: the copy costs little
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


_weight_major: dict[tuple, bool] = {}  # (out, in, rows, threads) -> the weight-major call is faster


def tunings() -> int:
    """How many kernel choices this process has timed so far. A caller that times its own
    steps (the server's mode policy) compares it before and after a step: a step that timed a
    kernel paid a one-off ~2 x TUNING_REPS calls and is no measure of its steady speed."""
    return len(_weight_major)


def _choice_key(weight: torch.Tensor, rows: int) -> tuple:
    return (*weight.shape, rows, torch.get_num_threads())


def _prefers_weight_major(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> bool:
    """Whether this width of call runs faster weight-major, timed once per shape, row count and
    thread count (float32 only; the first such call pays ~2 x TUNING_REPS calls' time)."""
    rows = x.numel() // x.shape[-1]
    if (weight.dtype != torch.float32 or not 2 <= rows <= TUNED_MAX_ROWS
            or rows * weight.numel() > TUNED_MAX_MACS
            or torch.are_deterministic_algorithms_enabled()):
        return False
    key = _choice_key(weight, rows)
    choice = _weight_major.get(key)
    if choice is None:
        medians = interleaved_medians({"packed": lambda: _packed_call(x, weight, bias),
                                       "weight_major": lambda: _weight_major_call(x, weight, bias)},
                                      TUNING_REPS)
        choice = medians["weight_major"] < WEIGHT_MAJOR_MARGIN * medians["packed"]
        _weight_major[key] = choice
    return choice


def warm_choices(model: torch.nn.Module, max_rows: int = TUNED_MAX_ROWS) -> int:
    """Time now every kernel choice ``model``'s packed float32 layers can need for calls of
    2..``max_rows`` rows (capped at TUNED_MAX_ROWS; a prefill's rows are its tokens, so a server
    warms them all), so no later call pays one; returns how many were timed. Nothing to do where
    the model is not packed or not float32."""
    shapes = {m.weight.shape: m for m, _, _ in _swaps_for(model) if m.weight.dtype == torch.float32}
    before = tunings()
    with torch.no_grad():
        for module in shapes.values():
            for rows in range(2, min(max_rows, TUNED_MAX_ROWS) + 1):
                if _choice_key(module.weight, rows) not in _weight_major:  # else: made already
                    x = torch.zeros(rows, module.in_features, dtype=module.weight.dtype)
                    _prefers_weight_major(x, module.weight, module.bias)
    return tunings() - before


def packed_linear_eager(x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` through the packed copy of ``weight``, or, for a float32 call of
    2..TUNED_MAX_ROWS rows where that measured faster here, as ``(weight @ x.T).T`` (oneDNN's
    small-M float32 kernels are slow on some AVX2 CPUs: see the module docstring)."""
    if _prefers_weight_major(x, weight, bias):
        return _weight_major_call(x, weight, bias)
    return _packed_call(x, weight, bias)


@torch.library.custom_op("distillspec::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """The operator a compiled step calls (opaque to the compiler; the same computation)."""
    return packed_linear_eager(x, weight, bias)


@packed_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _forward(module: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # another thread training the same module meanwhile
            return torch.nn.functional.linear(x, module.weight, module.bias)
        if torch.compiler.is_compiling():
            return packed_linear(x, module.weight, module.bias)
        return packed_linear_eager(x, module.weight, module.bias)

    return forward


def _available_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no figure, no packing
        return None


_swaps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packs(model: torch.nn.Module) -> bool:
    """Whether ``packed_linears`` packs this model's weights here (decided once per model)."""
    return bool(_swaps_for(model))


def _swaps_for(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, object]]:
    """Each linear layer with the method its packed call replaces and that call (the same
    function object every time, so a compiled step's guards hold), or [] where packing is off
    for this model. Decided again when the weights' device or dtype changed
    (``model.to("cuda")``, ``model.half()``)."""
    linears, placement, swaps = _swaps.get(model, (None, None, None))
    if linears is None:
        linears = _linears(model)
    now = _placement(linears)
    if swaps is None or now != placement:
        swaps = [(m, _packed_method(m), _forward(m)) for m in linears] if _decide(linears) else []
        _swaps[model] = (linears, now, swaps)
    return swaps


def _placement(linears: list[torch.nn.Linear]) -> tuple | None:
    return (linears[0].weight.device, linears[0].weight.dtype) if linears else None


def switched_on() -> bool:
    """``DISTILLSPEC_PACKED_LINEARS``: unset or 1 packs, 0 does not; anything else is refused
    (an ``off`` that silently meant on would be worse than an error)."""
    value = os.environ.get(ENV_SWITCH, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(
            f"{ENV_SWITCH}={value!r}: use 1 (pack linear weights for CPU decoding, the default) "
            "or 0 (use F.linear as it is)."
        )
    return value == "1"


def _decide(linears: list[torch.nn.Linear]) -> bool:
    if not switched_on() or not torch.backends.mkldnn.is_available():
        return False
    weights = [m.weight for m in linears]
    # inference tensors keep no version counter: a change to them could not be seen
    if not weights or any(w.device.type != "cpu" or w.is_inference() for w in weights):
        return False
    dtype = weights[0].dtype
    if dtype == torch.bfloat16:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    elif dtype != torch.float32:
        return False
    available = _available_bytes()
    needed = sum(w.numel() * w.element_size() for w in {id(w): w for w in weights}.values())
    return available is not None and needed <= MEMORY_SHARE * available


def _packed_method(module: torch.nn.Module) -> str:
    """The method whose result is ``x @ weight.T + bias``: ``forward`` of an nn.Linear, or the
    one a module names in its ``PACKED_CALL`` (a pruned draft head's kept rows)."""
    return "forward" if type(module) is torch.nn.Linear else module.PACKED_CALL


def _linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    # exact type only: subclasses (quantised, LoRA...) compute something else; a module that
    # names no PACKED_CALL now (an int8 pruned head) has nothing to pack
    return [m for m in model.modules()
            if type(m) is torch.nn.Linear or isinstance(getattr(m, "PACKED_CALL", None), str)]


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module) -> Iterator[None]:
    """Inside, ``model``'s linear layers run on packed weights where that pays (see above);
    gradients enabled or packing off: unchanged."""
    swaps = [] if torch.is_grad_enabled() else _swaps_for(model)
    # straight into the instance dicts: nn.Module.__setattr__ costs ~2 % of an eager step here
    for module, method, call in swaps:
        module.__dict__[method] = call
    try:
        yield
    finally:
        for module, method, _ in swaps:
            module.__dict__.pop(method, None)

"""distillspec: lossless, batched speculative decoding and DistillSpec draft distillation.

The public API is imported lazily (``distillspec --help`` must not pay for torch):

    from distillspec import load_pair, speculative_generate, autoregressive_generate
    from distillspec import Decoder, Request, distill, DistillConfig
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "Decoder": "distillspec.decoding.engine",
    "Request": "distillspec.decoding.requests",
    "GenerationResult": "distillspec.decoding.generate",
    "speculative_generate": "distillspec.decoding.generate",
    "autoregressive_generate": "distillspec.decoding.generate",
    "GenerationMetrics": "distillspec.decoding.metrics",
    "SamplingConfig": "distillspec.decoding.params",
    "SpeculationConfig": "distillspec.decoding.params",
    "compile_steps": "distillspec.decoding.kv_cache",
    "apply_compile": "distillspec.models.compilation",
    "load_model": "distillspec.models.loading",
    "load_pair": "distillspec.models.loading",
    "quantize_draft": "distillspec.models.quantize",
    "DistillConfig": "distillspec.training.config",
    "distill": "distillspec.training.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distillspec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__ + ["__version__"]

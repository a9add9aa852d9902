"""distillspec: lossless, batched speculative decoding and DistillSpec draft distillation."""

from distillspec.engine import GenerationResult, autoregressive_generate, speculative_generate
from distillspec.loading import load_model, load_pair
from distillspec.metrics import GenerationMetrics

__all__ = [
    "GenerationMetrics",
    "GenerationResult",
    "autoregressive_generate",
    "load_model",
    "load_pair",
    "speculative_generate",
]
__version__ = "0.1.0"

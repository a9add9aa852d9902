"""distillspec: lossless, batched speculative decoding and DistillSpec draft distillation."""

from distillspec.config import DistillConfig
from distillspec.engine import GenerationResult, autoregressive_generate, speculative_generate
from distillspec.loading import load_model, load_pair
from distillspec.metrics import GenerationMetrics

__all__ = [
    "DistillConfig",
    "distill",
    "GenerationMetrics",
    "GenerationResult",
    "autoregressive_generate",
    "load_model",
    "load_pair",
    "speculative_generate",
]
__version__ = "0.1.0"


def distill(config: DistillConfig) -> dict:
    """Run a DistillSpec recipe (see ``distillspec.train.distill``); imported lazily because
    the trainer pulls in ``accelerate``."""
    from distillspec.train import distill as _distill

    return _distill(config)

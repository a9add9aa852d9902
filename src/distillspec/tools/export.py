"""``distillspec export MODEL --to hf|gguf|vllm --out PATH``: a draft, ready where users serve.

* ``hf``: safetensors in bf16/fp16/fp32 with a full-vocabulary head (a pruned draft is
  expanded), the tokenizer, and a model card: ``base_model``, the licence inherited from the
  target, the measured alpha/tau, and copy-paste usage for transformers ``assistant_model=``,
  vLLM ``--speculative-config`` and llama.cpp ``-md``.
* ``gguf``: the same weights as one GGUF file (f16, q8_0 or f32) for llama.cpp; checked by
  loading it back with transformers' GGUF loader and comparing logits.
* ``vllm``: the hf export plus the checks vLLM's draft-model path relies on (an architecture it
  knows, the target's vocabulary size, tokenizer files) and the exact command line.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
import yaml

from distillspec.common.io import atomic_write_json, atomic_write_text
from distillspec.common.rundir import claim
from distillspec.common.runtime import load_options
from distillspec.models.loading import load_model, resolve_model_path
from distillspec.models.pruned_head import full_vocabulary
from distillspec.models.registry import BUILTIN_MODELS
from distillspec.tools.configs import ExportConfig

VLLM_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _recipe(folder: Path) -> dict:
    path = folder / "distill_config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _licence(target: str | None) -> str:
    """The target's licence: the built-in registry's, or its model card's front matter."""
    if target is None:
        return "unknown"
    name = target.removeprefix("builtin:")
    if target.startswith("builtin:") and name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].license
    card = Path(target) / "README.md"
    if card.is_file():
        match = re.search(r"^license:\s*(\S+)", card.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            return match.group(1)
    return "unknown"


def _measured(folder: Path) -> dict:
    path = folder / "eval_metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def usage_lines(out: Path, target: str, gamma: int, gguf_file: Path | None = None) -> dict:
    draft = str(out)
    config = json.dumps({"model": draft, "num_speculative_tokens": gamma, "method": "draft_model"})
    return {
        "transformers": (
            "from transformers import AutoModelForCausalLM\n"
            f"draft = AutoModelForCausalLM.from_pretrained({draft!r})\n"
            "output = target.generate(**inputs, assistant_model=draft)"
        ),
        "vllm": f"vllm serve {target} --speculative-config '{config}'",
        "llama.cpp": (
            f"llama-server -m TARGET.gguf -md {gguf_file or 'DRAFT.gguf'} --draft-max {gamma}"
        ),
    }


def _card(config: ExportConfig, target: str, licence: str, measured: dict, usage: dict) -> str:
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in measured.items() if isinstance(v, float))
    return f"""---
library_name: transformers
base_model: {target}
license: {licence}
tags: [distillspec, speculative-decoding, draft-model]
---
# Draft model for `{target}`

A DistillSpec draft for speculative decoding of `{target}`: it proposes tokens, the target
verifies them, and the output stays exactly the target's. Licence inherited from the target.

## Measured (held-out prompts, target-generated continuations)
| metric | value |
|---|---|
{metrics or "| (not measured) | |"}

## Use it
transformers:
```python
{usage["transformers"]}
```
vLLM:
```bash
{usage["vllm"]}
```
llama.cpp (export with `--to gguf`):
```bash
{usage["llama.cpp"]}
```
"""


def run_export(config: ExportConfig) -> dict:
    source = resolve_model_path(config.model)
    recipe = _recipe(source)
    target = config.target or recipe.get("target")
    if target is None:
        raise ValueError(f"{config.model} has no distill_config.yaml naming its target: pass --target.")
    out = claim(config.out, "export")
    runtime = config.runtime
    model, tokenizer = load_model(source, **{**load_options(runtime), "device": "cpu",
                                             "dtype": config.precision, "device_map": None})
    out.track("model", "draft.gguf", "export.json")
    hf_dir = out.child("model")
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    with full_vocabulary(model):
        model.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        report = {"format": config.to, "source": str(source), "target": target, "model": str(hf_dir)}
        if config.to == "gguf":
            report["gguf"] = str(_write_gguf(model, tokenizer, hf_dir, out, config, target))
        if config.to == "vllm":
            report["checks"] = vllm_checks(hf_dir, target)
    gguf_file = Path(report["gguf"]) if "gguf" in report else None
    engine_target = str(resolve_model_path(target)) if target.startswith("builtin:") else target
    usage = usage_lines(hf_dir, engine_target, config.gamma, gguf_file)
    atomic_write_text(hf_dir / "README.md",
                      _card(config, target, _licence(target), _measured(source), usage))
    report["usage"] = usage
    atomic_write_json(out.child("export.json"), report)
    for name, line in usage.items():
        print(f"{name}:\n{line}\n")
    print(f"distillspec: exported {config.model} to {out.path} ({config.to})", file=sys.stderr)
    return report


def _write_gguf(model, tokenizer, hf_dir: Path, out, config: ExportConfig, target: str) -> Path:
    from distillspec.models.gguf_export import logits_difference, write_gguf

    source_gguf = None
    target_folder = resolve_model_path(target)
    if (target_folder / "SOURCE").is_file():  # a target converted from GGUF
        source_gguf = Path((target_folder / "SOURCE").read_text().strip())
    path = write_gguf(model.float(), tokenizer, hf_dir, out.child("draft.gguf"),
                      quantization=config.gguf_type, source_gguf=source_gguf)
    tokens = torch.tensor([list(range(1, 17))])
    difference = logits_difference(model, path, tokens)
    print(f"distillspec: GGUF round trip: max |logit difference| {difference:.4f}", file=sys.stderr)
    return path


def vllm_checks(hf_dir: Path, target: str) -> dict:
    """What vLLM's draft-model path needs, checked; raises with what is wrong."""
    config = json.loads((hf_dir / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not set(architectures) & set(VLLM_ARCHITECTURES):
        raise ValueError(f"vLLM draft models must be one of {VLLM_ARCHITECTURES}; got {architectures}.")
    target_config = json.loads((resolve_model_path(target) / "config.json").read_text())
    if config.get("vocab_size") != target_config.get("vocab_size"):
        raise ValueError(
            f"vocab_size {config.get('vocab_size')} differs from the target's "
            f"{target_config.get('vocab_size')}: vLLM needs them equal."
        )
    missing = [name for name in TOKENIZER_FILES if not (hf_dir / name).is_file()]
    if missing:
        raise ValueError(f"tokenizer files missing from {hf_dir}: {', '.join(missing)}.")
    return {"architecture": architectures[0], "vocab_size": config["vocab_size"],
            "tokenizer_files": list(TOKENIZER_FILES)}


"""``distillspec export MODEL --to hf|gguf|vllm --out PATH``: a draft, ready where users serve.

* ``hf``: safetensors in bf16/fp16/fp32 with a full-vocabulary head (a pruned draft is
  expanded), the tokenizer, and a model card (``huggingface_hub.ModelCard``): ``base_model``
  (the target's Hub id where one is known, else left out), the licence inherited from the
  target, the measured alpha/tau and fastest setting, and usage for transformers
  ``assistant_model=``, vLLM ``--speculative-config`` and llama.cpp ``-md``. The card names no
  path of this machine (placeholders stand for the folders); the printed lines use the paths.
* ``gguf``: the same weights as one GGUF file (f16, q8_0 or f32) for llama.cpp, named after the
  target, with its base model and licence; checked by loading it back with transformers' GGUF
  loader and comparing logits.
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

from distillspec.common.io import atomic_write_json, atomic_write_text, read_yaml_mapping
from distillspec.common.rundir import claim
from distillspec.common.runtime import load_options
from distillspec.models.loading import load_model, resolve_model_path
from distillspec.models.pruned_head import full_vocabulary
from distillspec.models.recommended import saved_setting
from distillspec.models.registry import BUILTIN_MODELS, hub_id_for
from distillspec.tools.configs import ExportConfig

VLLM_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_GAMMA = 4  # the printed commands' num_speculative_tokens when nothing was measured
TAGS = ["distillspec", "speculative-decoding", "draft-model"]


def _recipe(folder: Path) -> dict:
    path = folder / "distill_config.yaml"
    return read_yaml_mapping(path, "draft's recipe") if path.is_file() else {}


def _licence(target: str | None) -> str:
    """The target's licence: the built-in registry's, or its model card's front matter."""
    if target is None:
        return "unknown"
    name = target.removeprefix("builtin:")
    if target.startswith("builtin:") and name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].license
    try:  # a folder, or a Hub id's cached snapshot
        card = resolve_model_path(target) / "README.md"
    except ValueError:  # a Hub id not in the local cache: the target runs elsewhere
        return "unknown"
    if card.is_file():
        match = re.search(r"^license:\s*(\S+)", card.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            return match.group(1)
    return "unknown"


def _measured(folder: Path) -> dict:
    path = folder / "eval_metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def usage_lines(draft: str, target: str, gamma: int, gguf_file: str = "DRAFT.gguf") -> dict:
    config = json.dumps({"model": draft, "num_speculative_tokens": gamma, "method": "draft_model"})
    return {
        "transformers": (
            "from transformers import AutoModelForCausalLM\n"
            f"draft = AutoModelForCausalLM.from_pretrained({draft!r})\n"
            "output = target.generate(**inputs, assistant_model=draft)"
        ),
        "vllm": f"vllm serve {target} --speculative-config '{config}'",
        "llama.cpp": f"llama-server -m TARGET.gguf -md {gguf_file} --draft-max {gamma}",
    }


def export_gamma(config: ExportConfig, setting: dict | None) -> tuple[int, str]:
    """The printed commands' gamma and where it comes from: --gamma, else the setting
    ``distillspec demo`` measured fastest for this draft, else DEFAULT_GAMMA."""
    if config.gamma is not None:
        return config.gamma, "--gamma"
    if setting is not None:
        return setting["gamma"], "the fastest setting measured for this draft"
    return DEFAULT_GAMMA, "no setting was measured for this draft"


def _setting_text(setting: dict | None, gamma: int, source: str) -> str:
    if setting is None:
        return (f"No speed was measured for this draft; the commands below use gamma {gamma} "
                f"({source}).")
    tree = f", tree `{setting['tree']}`" if setting["tree"] else ""
    speedup = (f": {setting['speedup']:.2f}x the target alone"
               if setting["speedup"] is not None else "")
    where = ", ".join(str(setting[k]) for k in ("machine", "dtype") if setting.get(k))
    text = (f"`distillspec demo` measured this draft fastest at gamma {setting['gamma']}, "
            f"confidence threshold {setting['confidence_threshold']:g}{tree}{speedup}"
            f"{f' ({where})' if where else ''}. The commands below use gamma {gamma}")
    if source == "--gamma":
        return text + " (--gamma)."
    return text + (" (the fastest chain measured: vLLM and llama.cpp draft chains, not trees)."
                   if setting["tree"] else ".")


def model_card(target_hub: str | None, licence: str, measured: dict, setting: dict | None,
               gamma: int, gamma_source: str):
    """The exported draft's ``huggingface_hub.ModelCard``: no path of this machine in it."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", base_model=target_hub, license=licence,
                         pipeline_tag="text-generation", tags=TAGS)
    target = f"`{target_hub}`" if target_hub else "its target"
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in measured.items() if isinstance(v, float))
    usage = usage_lines("DRAFT", target_hub or "TARGET", gamma)
    body = f"""# DistillSpec draft for {target}

A DistillSpec draft for speculative decoding of {target}: it proposes tokens, the target
verifies them, and the output stays exactly the target's. Licence inherited from the target.

## Measured (held-out prompts, target-generated continuations)
| metric | value |
|---|---|
{metrics or "| (not measured) | |"}

{_setting_text(setting, gamma, gamma_source)}

## Use it
`DRAFT` is this folder (or its Hub id once uploaded){"" if target_hub else ", `TARGET` the target"}.

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
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def run_export(config: ExportConfig) -> dict:
    source = resolve_model_path(config.model)
    recipe = _recipe(source)
    target = config.target or recipe.get("target")
    if target is None:
        raise ValueError(f"{config.model} has no distill_config.yaml naming its target: pass --target.")
    target_hub = hub_id_for(target)
    setting = saved_setting(source)
    if setting is not None and setting.get("target") != str(target):
        setting = None  # measured with another target: it says nothing about this pair
    gamma, gamma_source = export_gamma(config, setting)
    out = claim(config.out, "export")
    runtime = config.runtime
    model, tokenizer = load_model(source, **{**load_options(runtime), "device": "cpu",
                                             "dtype": config.precision, "device_map": None})
    out.track("model", "draft.gguf", "export.json")
    hf_dir = out.child("model")
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    licence = _licence(target)
    with full_vocabulary(model):
        model.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        report = {"format": config.to, "source": str(source), "target": target,
                  "base_model": target_hub, "gamma": gamma, "model": str(hf_dir)}
        if config.to == "gguf":
            report["gguf"] = str(_write_gguf(model, tokenizer, hf_dir, out, config, target,
                                             target_hub, licence))
        if config.to == "vllm":
            report["checks"] = vllm_checks(hf_dir, target)
    engine_target = str(resolve_model_path(target)) if target.startswith("builtin:") else target
    usage = usage_lines(str(hf_dir), engine_target, gamma, report.get("gguf", "DRAFT.gguf"))
    card = model_card(target_hub, licence, _measured(source), setting, gamma, gamma_source)
    atomic_write_text(hf_dir / "README.md", str(card))
    report["usage"] = usage
    atomic_write_json(out.child("export.json"), report)
    for name, line in usage.items():
        print(f"{name}:\n{line}\n")
    print(f"distillspec: gamma {gamma} in these commands ({gamma_source})", file=sys.stderr)
    print(f"distillspec: exported {config.model} to {out.path} ({config.to})", file=sys.stderr)
    return report


def _write_gguf(model, tokenizer, hf_dir: Path, out, config: ExportConfig, target: str,
                target_hub: str | None, licence: str) -> Path:
    from distillspec.models.gguf_export import GGUFInfo, logits_difference, write_gguf

    source_gguf = None
    target_folder = resolve_model_path(target)
    if (target_folder / "SOURCE").is_file():  # a target converted from GGUF
        source_gguf = Path((target_folder / "SOURCE").read_text().strip())
    info = GGUFInfo.for_target(target_hub, licence)
    path = write_gguf(model.float(), tokenizer, hf_dir, out.child("draft.gguf"),
                      quantization=config.gguf_type, source_gguf=source_gguf, info=info)
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


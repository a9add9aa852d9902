"""``distillspec generate`` and ``distillspec datagen``: prompts in, text (or JSONL) out.

Prompt files are JSONL with ``{"prompt": str}`` or ``{"messages": [...]}`` lines. Plain prompts
get the target's chat template when it has one (``--chat`` / ``--no-chat`` decide explicitly);
``messages`` always do. ``--stream`` prints tokens as they are accepted, through the
step-level engine.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from distillspec.common.io import read_jsonl
from distillspec.common.runtime import (
    apply_threads,
    load_options,
    pair_options,
    refuse_draft_quantize,
    resolve_device,
    resolve_dtype,
)
from distillspec.decoding.engine import Decoder
from distillspec.decoding.generate import GenerationResult, run_to_completion
from distillspec.decoding.params import SpeculationConfig
from distillspec.decoding.requests import Request
from distillspec.decoding.timing import SyncTimer
from distillspec.models.compilation import apply_compile, summary
from distillspec.models.loading import eos_token_ids, load_model, load_pair
from distillspec.models.quantize import draft_quantization
from distillspec.models.recommended import recommended_for, setting_at
from distillspec.models.registry import distilled_draft_for
from distillspec.tools.configs import EXAMPLE_PROMPT, GenerateConfig
from distillspec.training.config import DEFAULT_TARGET, DatagenConfig


@dataclass
class PromptLine:
    text: str | None = None  # a plain prompt
    messages: list[dict] | None = None  # a chat conversation

    def shown(self) -> str:
        return self.text if self.text is not None else json.dumps(self.messages)


def read_prompt_lines(path: str) -> list[PromptLine]:
    """Every line's ``prompt`` or ``messages``; errors name the file and the line."""
    lines = []
    for number, record in read_jsonl(path):
        if "messages" in record:
            messages = record["messages"]
            if not (
                isinstance(messages, list)
                and messages
                and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
            ):
                raise ValueError(
                    f'{path}:{number}: "messages" must be a non-empty list of '
                    '{"role": ..., "content": ...} objects.'
                )
            lines.append(PromptLine(messages=messages))
            continue
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(
                f'{path}:{number}: missing or empty "prompt" string; each line needs one, e.g. '
                '{"prompt": "Once upon a time"}, or a "messages" list.'
            )
        lines.append(PromptLine(text=prompt))
    if not lines:
        raise ValueError(f"{path} contains no prompts.")
    return lines


def encode_prompt(tokenizer, line: PromptLine, chat: bool | None) -> list[int]:
    """Token ids: chat template for ``messages`` (and for text when ``chat``), else plain."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_chat = line.messages is not None or (chat if chat is not None else has_template)
    if use_chat:
        if not has_template:
            raise ValueError(
                "This prompt needs a chat template (--chat or a messages line) but the "
                "tokenizer has none. Use --no-chat and plain prompts."
            )
        messages = line.messages or [{"role": "user", "content": line.text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(line.text)["input_ids"])


def speculation_for(
    speculation: SpeculationConfig, draft_spec: str, target_spec: str, target, use_measured: bool,
    temperature: float = 0.0,
) -> SpeculationConfig:
    """The user's setting, or (``use_measured``) the one the demo measured fastest for this
    draft folder with this target on this machine kind and dtype, at ``temperature`` (> 0: the
    setting it timed sampled, where it timed one; else the greedy one)."""
    if not use_measured or not Path(draft_spec).is_dir():
        return speculation
    saved = recommended_for(draft_spec, target_spec, target.device, target.dtype)
    if saved is None:
        return speculation
    setting = setting_at(saved, temperature)
    timed = f"timed at T={setting['temperature']:g}" if "temperature" in setting else "timed greedy"
    tree = f", tree {setting['tree']}" if setting["tree"] else ""
    lookup = f", prompt lookup {setting['lookup']}" if setting.get("lookup") else ""
    print(f"distillspec: gamma {setting['gamma']}, confidence threshold "
          f"{setting['confidence_threshold']:g}{tree}{lookup} (measured fastest for this draft "
          f"on this machine, {timed}; --gamma / --confidence-threshold / --tree / --lookup "
          "override)", file=sys.stderr)
    return replace(speculation, gamma=setting["gamma"],
                   confidence_threshold=setting["confidence_threshold"], tree=setting["tree"],
                   lookup=setting.get("lookup", 0))


def auto_draft(target: str, runtime, temperature: float = 0.0) -> str:
    """``--draft auto``: the draft ``distillspec demo`` distilled for ``target``, unless the demo
    measured it slower than the target alone on this machine kind and dtype (at
    ``temperature``'s setting, ``setting_at``); else ``none``."""
    found = distilled_draft_for(target)
    if found is None:
        hint = " Run `distillspec demo` to distil one." if target == DEFAULT_TARGET else ""
        print(f"distillspec: no distilled draft for {target}: plain decoding.{hint}",
              file=sys.stderr)
        return "none"
    device = resolve_device(runtime.device)
    saved = recommended_for(found, target, device, resolve_dtype(runtime.model_dtype, device))
    setting = setting_at(saved, temperature) if saved else {}
    speedup = setting.get("speedup")
    at = f" at T={setting['temperature']:g}" if "temperature" in setting else ""
    if speedup is not None and speedup < 1.0:
        print(f"distillspec: the distilled draft {found} measured {speedup:.2f}x the target "
              f"alone on this machine at its best setting{at}, so plain decoding is faster here "
              f"(--draft {found} uses it anyway; a longer `distillspec demo --minutes N` may "
              "make it pay).", file=sys.stderr)
        return "none"
    measured = f", measured {speedup:.2f}x here{at}" if speedup is not None else ""
    print(f"distillspec: draft: {found} (distilled by `distillspec demo`{measured})",
          file=sys.stderr)
    return str(found)


def load_for_decoding(target_spec: str, draft_spec: str, runtime, compile_mode: str,
                      batch_size: int = 1, tokens: int | None = None, temperature: float = 0.0):
    """Target, draft (or None), tokenizer and the draft spec used (``auto``: the demo's
    distilled draft, if it pays at ``temperature``), with ``--compile`` applied and said;
    shared by generate and serve."""
    if draft_spec == "none":
        refuse_draft_quantize(runtime, "--draft none")
    if draft_spec == "auto":
        draft_spec = auto_draft(target_spec, runtime, temperature)
        if draft_spec == "none" and runtime.draft_quantize == "int8":
            print("distillspec: --draft-quantize has no draft to act on here", file=sys.stderr)
    if draft_spec == "none":
        target, tokenizer = load_model(target_spec, **load_options(runtime))
        draft = None
    else:
        target, draft, tokenizer = load_pair(target_spec, draft_spec, **pair_options(runtime))
        if runtime.draft_quantize == "auto" and draft_quantization(draft) == "int8":
            print("distillspec: int8 draft weights (`distillspec demo` measured this draft "
                  "faster so on this machine; --draft-quantize none keeps them as loaded)",
                  file=sys.stderr)
    decisions = apply_compile(compile_mode, batch_size, tokens, target=target, draft=draft)
    print(f"distillspec: {summary(decisions)}", file=sys.stderr)
    return target, draft, tokenizer, draft_spec


def run_generate(config: GenerateConfig) -> int:
    apply_threads(config.runtime)
    lines = (
        read_prompt_lines(config.prompts)
        if config.prompts
        else [PromptLine(text=config.prompt or EXAMPLE_PROMPT)]
    )
    target, draft, tokenizer, draft_spec = load_for_decoding(
        config.target, config.draft, config.runtime, config.compile, config.batch_size,
        len(lines) * config.max_new_tokens, config.sampling.temperature)
    speculation = speculation_for(config.speculation, draft_spec, config.target, target,
                                  config.measured_setting, config.sampling.temperature)
    stop = frozenset(eos_token_ids(target, tokenizer))
    prompts = [encode_prompt(tokenizer, line, config.chat) for line in lines]
    for start in range(0, len(prompts), config.batch_size):
        decoder = Decoder(
            target,
            draft,
            speculation,
            generator=torch.Generator(device=target.device).manual_seed(config.seed + start),
            probe=SyncTimer(target.device),  # the report's draft and target times
        )
        requests = [
            Request(ids, config.max_new_tokens, config.sampling, stop)
            for ids in prompts[start : start + config.batch_size]
        ]
        if config.stream:
            result = _stream(decoder, requests[0], tokenizer)
        else:
            result = run_to_completion(decoder, requests)
        _print_batch(config, tokenizer, lines[start : start + config.batch_size], result)
    return 0


def _stream(decoder: Decoder, request: Request, tokenizer) -> GenerationResult:
    """Print text as blocks are accepted; returns the same result as a plain run."""
    tokens: list[int] = []
    printed = ""

    def show(update) -> None:
        nonlocal printed
        tokens.extend(update.new_tokens)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.startswith(printed) and not text.endswith("\ufffd"):  # whole characters only
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    result = run_to_completion(decoder, [request], on_update=show)
    sys.stdout.write("\n")
    return result


def _print_batch(config: GenerateConfig, tokenizer, lines, result: GenerationResult) -> None:
    batch_info = {
        "batch_wall_time_s": result.metrics.wall_time_s,
        "batch_tokens_per_second": result.metrics.tokens_per_second,
        "batch_draft_time_s": result.metrics.draft_time_s,
        "batch_target_time_s": result.metrics.target_time_s,
    }
    for row, (line, tokens) in enumerate(zip(lines, result.sequences)):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if config.json:
            metrics = {**result.metrics.row_dict(row), **batch_info}
            record = {"prompt": line.text, "messages": line.messages, "text": text,
                      "token_ids": tokens, "metrics": metrics}
            print(json.dumps({k: v for k, v in record.items() if v is not None}))
        elif not config.stream:
            print(text)
            print()
    if not config.json:
        print(f"[{result.metrics.summary()}]")


def run_datagen(config: DatagenConfig) -> int:
    """Sample target completions for a prompt set and write them atomically as JSONL; under
    torchrun / ``accelerate launch`` every rank answers its shards of the prompts."""
    from tqdm.auto import tqdm

    from distillspec.models.loading import check_model_spec
    from distillspec.training.datagen import (
        datagen_sharded,
        is_datagen_file,
        prompt_openers,
        self_prompts,
        write_prompt_pool,
    )
    from distillspec.training.datasets import load_examples

    apply_threads(config.runtime)
    out = Path(config.out)
    if out.is_dir() or out.is_symlink():
        raise ValueError(f"--out {out} is a folder or a link; give a .jsonl file path.")
    if out.exists() and not (config.overwrite and is_datagen_file(out)):
        reason = "pass --overwrite to replace it" if is_datagen_file(out) else (
            "it is not a file datagen wrote, so it is left alone; choose another --out")
        raise ValueError(f"{out} exists: {reason}.")
    check_model_spec(config.target, config.runtime.allow_download)
    ranks, options = _datagen_ranks(config)
    target, tokenizer = load_model(config.target, **options)
    eos = eos_token_ids(target, tokenizer)
    if config.self_prompts:
        with tqdm(total=config.self_prompts, unit="prompt", desc="self-prompts") as bar:
            prompts = self_prompts(target, tokenizer, config.self_prompts, seed=config.seed,
                                   eos_token_id=eos, batch_size=config.batch_size,
                                   max_new_tokens=config.max_new_tokens,
                                   temperature=config.temperature or 1.0,
                                   openers=prompt_openers(config.prompt_openers),
                                   progress=bar.update)
        write_prompt_pool(prompts, out)
        print(f"wrote {len(prompts)} self-generated prompts to {out}", file=sys.stderr)
        return 0
    examples = load_examples(config.data, tokenizer, max_prompt_tokens=config.max_prompt_tokens)
    generator = torch.Generator(device=target.device).manual_seed(config.seed)
    count = datagen_sharded(
        target, tokenizer, examples, out, temperature=config.temperature,
        max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
        eos_token_id=eos, generator=generator, job=config.target,
        shard_prompts=config.shard_prompts, ranks=ranks, replace=config.overwrite,
    )
    if ranks.is_main_process:
        where = f" ({ranks.num_processes} ranks)" if ranks.num_processes > 1 else ""
        print(f"wrote {count} target completions to {out}{where}", file=sys.stderr)
    return 0


def _datagen_ranks(config: DatagenConfig):
    """The ranks datagen runs on (one without torchrun / accelerate launch) and how each loads
    the target: on its own device when there are several."""
    options = load_options(config.runtime)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # set by torchrun and accelerate launch
        from distillspec.training.shards import ONE_RANK

        return ONE_RANK, options
    runtime = config.runtime
    if config.self_prompts:
        raise ValueError(
            "--self-prompts runs in one process: a prompt is kept only if it repeats none kept "
            "before it, so ranks cannot split the work. Run it without torchrun / accelerate "
            "launch, then answer the pool on several ranks with --data."
        )
    if runtime.device_map or runtime.device.startswith("cuda:"):
        raise ValueError(
            f"With several ranks each rank loads the target on its own device, so "
            f"{'--device-map' if runtime.device_map else '--device ' + runtime.device} cannot "
            "apply; use --device auto, cuda or cpu (one device per rank)."
        )
    from accelerate import PartialState

    state = PartialState(cpu=runtime.device == "cpu")
    return state, {**options, "device": state.device}

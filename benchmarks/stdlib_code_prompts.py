"""Write code prompts of another source than HumanEval: functions of the Python standard library,
each cut to its signature and docstring (HumanEval's prompt shape), as JSONL ``{"prompt": ...}``
lines for ``distillspec eval --task text --data``.

Modules are those of ``MODULES`` (none of them in ``builtin:stdlib-code``'s list, so no draft
trained on that corpus has seen them; a module that is a package in this Python version is read
from its ``__init__.py``, one that is gone is skipped); in each, the top-level functions with a docstring of at least
``MIN_DOC`` characters, in file order; then ``--count`` of them, round-robin over the modules so
that no module dominates. Deterministic for one Python version.

    python benchmarks/stdlib_code_prompts.py --count 16 --out stdlib-prompts.jsonl
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import sysconfig
from pathlib import Path

MODULES = (
    "_pydecimal", "asyncio/tasks", "cgi", "email/utils", "ftplib", "gzip", "inspect", "locale",
    "mimetypes", "ntpath", "os", "pathlib", "posixpath", "quopri", "shutil", "smtplib",
    "socket", "subprocess", "tarfile", "tempfile", "traceback", "warnings", "zipfile",
)  # fmt: skip
MIN_DOC = 40


def function_prompts(path: Path) -> list[str]:
    """Each top-level function of ``path`` with a docstring: its source up to the docstring's end."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    prompts = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < MIN_DOC or node.decorator_list:
            continue
        end = node.body[0].end_lineno  # the docstring's last line
        prompts.append("".join(lines[node.lineno - 1:end]))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=16, help="prompts to write")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    args = parser.parse_args()
    root = Path(sysconfig.get_paths()["stdlib"])
    if args.count < 1:
        parser.error("--count must be >= 1")
    files = [root / f"{name}.py" if (root / f"{name}.py").exists() else root / name / "__init__.py"
             for name in MODULES]
    per_module = [function_prompts(path) for path in files if path.exists()]
    chosen = [prompt for group in itertools.zip_longest(*per_module) for prompt in group
              if prompt is not None][: args.count]
    with open(args.out, "w", encoding="utf-8") as handle:
        for prompt in chosen:
            handle.write(json.dumps({"prompt": prompt}) + "\n")
    print(f"wrote {len(chosen)} prompts from {len(per_module)} modules to {args.out}")


if __name__ == "__main__":
    main()

"""Training data for M's draft in HumanEval's shape, from another source: every function and
method with a docstring in builtin:stdlib-code's 40 modules (STDLIB_MODULES; none of them is in
benchmarks/stdlib_code_prompts.py's list, where the gamma is chosen), as JSONL
{"prompt": signature + docstring, "completion": the real body}, dedented.

    python stdlib_functions.py OUT.jsonl
"""
import ast, json, sys, sysconfig, textwrap
from pathlib import Path
from distillspec.training.builtin_data import STDLIB_MODULES

root = Path(sysconfig.get_paths()["stdlib"])
records = []
for module in STDLIB_MODULES:
    base = root.joinpath(*module.split("."))
    files = [f for f in (base.parent / f"{base.name}.py", base / "__init__.py") if f.is_file()]
    if not files:
        continue
    source = files[0].read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 10 or len(node.body) < 2:
            continue
        split = node.body[0].end_lineno
        text = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))  # def line on (decorators left out)
        head_lines = split - node.lineno + 1
        parts = text.splitlines(keepends=True)
        prompt, completion = "".join(parts[:head_lines]), "".join(parts[head_lines:])
        if completion.strip():
            records.append({"prompt": prompt, "completion": completion, "module": module})
with open(sys.argv[1], "w") as out:
    for r in records:
        out.write(json.dumps(r) + "\n")
print(len(records), "functions from", len({r["module"] for r in records}), "modules")

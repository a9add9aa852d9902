"""The architecture is a rule, not a habit: layers import only downward, and the CLI is light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "distillspec"
# Each layer may import itself and the layers listed after it.
ALLOWED = {
    "common": {"common"},
    "decoding": {"common", "decoding"},
    "models": {"common", "decoding", "models"},
    "training": {"common", "decoding", "models", "training"},
    "tools": {"common", "decoding", "models", "training", "tools"},
}


def imported_layers(path: Path) -> set[tuple[str, int]]:
    """(layer, line) for every ``distillspec.<layer>`` import anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "distillspec" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add((parts[1], node.lineno))
    return found


def test_every_module_lives_in_a_layer():
    loose = sorted(
        p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    )
    assert loose == [], f"modules outside the layers: {loose}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(
        ALLOWED
    )


def test_layers_import_only_downwards():
    violations = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for imported, line in imported_layers(path):
                if imported not in allowed:
                    violations.append(f"{path.relative_to(PACKAGE)}:{line} imports {imported}")
    assert violations == []


def test_the_checker_sees_a_violation(tmp_path):
    """Negative control: an upward import, even inside a function, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from distillspec.tools.cli import main\n")
    assert imported_layers(bad) == {("tools", 2)}


def test_cli_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from distillspec.tools.cli import build_parser\n"
        "for name in ('generate', 'distill', 'bench', 'demo'):\n"
        "    try:\n"
        "        build_parser().parse_args([name, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_public_api_still_imports():
    import distillspec

    for name in ("load_pair", "speculative_generate", "autoregressive_generate", "distill",
                 "DistillConfig", "Decoder", "Request"):
        assert callable(getattr(distillspec, name)) or isinstance(getattr(distillspec, name), type)


def test_functions_and_decoding_classes_stay_short():
    """Issue 22's size rule: no function over 60 lines anywhere in the package, and the
    Decoder and each decoding strategy under 250."""
    long_functions, long_classes = [], []
    strategies = {"Decoder", "ChainStep", "TreeStep", "DynamicTreeStep"}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > 60:
                long_functions.append(f"{path.name}:{node.name} ({lines} lines)")
            if isinstance(node, ast.ClassDef) and node.name in strategies and lines >= 250:
                long_classes.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long_functions, long_functions
    assert not long_classes, long_classes

"""Packaging: the wheel declares ranges, so it installs beside a different transformers release
without replacing it (exact pins live in constraints.txt, for ./dev); every range's floor is one
that works (.ci/floors installs all of them and runs the tests marked below); the licence and
``--version``."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import re
import subprocess
import sys
import sysconfig
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import left_padded, save_tiny

ROOT = Path(__file__).resolve().parents[1]
OTHER_TRANSFORMERS = "5.23.0"  # the suite itself runs 5.24.0 (constraints.txt)


def pyproject() -> dict:
    import tomllib  # Python 3.11+

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def lowest_module():
    spec = importlib.util.spec_from_file_location("lowest", ROOT / ".ci" / "lowest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/transformers/", timeout=10)
        return True
    except OSError:
        return False


def test_metadata_declares_ranges_and_constraints_pin_them():
    project = pyproject()["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra]
    assert not [d for d in requirements if "==" in d], "ranges only in the metadata"
    pinned = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().split()
              if "==" in line}
    for dependency in requirements:
        name = dependency.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
        assert name.replace("_", "-") in {p.replace("_", "-") for p in pinned}, name


def test_every_range_has_one_floor_for_the_floors_job():
    floors = lowest_module().floors(pyproject())
    assert floors["transformers"] == "5.22" and floors["openai"] == "1.55.3"
    # transformers 5.22 itself needs these; lower floors could not be installed beside it
    assert floors["huggingface-hub"] == "1.31" and floors["safetensors"] == "0.8"
    with pytest.raises(ValueError, match="exactly one '>=' floor"):
        lowest_module().floors({"project": {"dependencies": ["numpy"]}})
    with pytest.raises(ValueError, match="two floors"):
        lowest_module().floors({"project": {"dependencies": ["numpy>=1"], "optional-dependencies":
                                            {"x": ["numpy>=2"]}}})


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_import_of_the_package_is_a_declared_dependency():
    """Each third-party module src/ imports (at any level) comes from a distribution the core
    dependencies or the [serve] extra name: `pip install 'distillspec[serve]'` runs serve and
    bench-serve (bench-serve's openai client was once only in the test extra)."""
    project = pyproject()["project"]
    declared = {normalised(re.split(r"[<>=!~\[; ]", r)[0])
                for r in project["dependencies"] + project["optional-dependencies"]["serve"]}
    providers = importlib.metadata.packages_distributions()
    imported: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "distillspec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for top in {n.split(".")[0] for n in names if n}:
                if top not in sys.stdlib_module_names and top != "distillspec":
                    imported.setdefault(top, set()).add(path.name)
    assert {"openai", "fastapi", "uvicorn", "prometheus_client"} <= set(imported)
    for module, files in imported.items():
        distributions = {normalised(d) for d in providers.get(module, [module])}
        assert distributions & declared, f"{module} (imported by {sorted(files)}) is not declared"


def test_every_module_imports():
    """With the extras installed (as the floors job installs them), nothing fails to import."""
    import distillspec

    names = [m.name for m in pkgutil.walk_packages(distillspec.__path__, "distillspec.")
             if not m.name.endswith("__main__")]
    assert "distillspec.tools.serve" in names and "distillspec.tools.bench_serve" in names
    for name in names:
        importlib.import_module(name)


def test_a_saved_tiny_pair_decodes_exactly_like_transformers(tmp_path):
    """The floors job's decode: a tiny Llama saved as safetensors and loaded by our loader, its
    draft its first layer; SD (ragged batch, several gammas) and our plain decoding both equal
    transformers' own greedy generate."""
    from distillspec import autoregressive_generate, load_pair, speculative_generate

    save_tiny(tmp_path / "target", layers=3)
    target, draft, _ = load_pair(tmp_path / "target", "target-layers:1", device="cpu",
                                 dtype="float32")
    input_ids, attention_mask = left_padded([6, 3, 9])
    reference = target.generate(input_ids=input_ids, attention_mask=attention_mask,
                                max_new_tokens=16, do_sample=False, pad_token_id=0,
                                eos_token_id=None)[:, input_ids.shape[1]:].tolist()
    plain = autoregressive_generate(target, input_ids, attention_mask, max_new_tokens=16)
    assert plain.sequences == reference
    for gamma in (1, 3):
        result = speculative_generate(target, draft, input_ids, attention_mask, gamma=gamma,
                                      max_new_tokens=16, generator=torch.Generator().manual_seed(0))
        assert result.sequences == reference, gamma
        assert result.metrics.total.target_calls < 3 * 16  # it speculated: fewer target calls


def test_version_flag_prints_the_installed_version(capsys):
    import distillspec
    from distillspec.tools.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    installed = importlib.metadata.version("distillspec")
    assert capsys.readouterr().out.strip() == f"distillspec {installed}"
    assert installed == distillspec.__version__ == pyproject()["project"]["version"]


def test_the_licence_file_is_the_one_the_metadata_names():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150  # the full text
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


@pytest.mark.slow
@pytest.mark.skipif(not pypi_reachable(), reason="needs the PyPI registry")
def test_wheel_installs_beside_another_transformers_version(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(dist)], check=True)
    wheel = next(dist.glob("distillspec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if ".dist-info/" in n and n.endswith("LICENSE")], names
    env_dir = tmp_path / "user-env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The user's environment already has torch & co. (borrowed from ours, no multi-GB download)
    (Path(site) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", f"transformers=={OTHER_TRANSFORMERS}"], check=True)
    subprocess.run([*pip, str(wheel)], check=True)
    version = subprocess.run(
        [python, "-c", "import transformers, distillspec; print(transformers.__version__)"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert version == OTHER_TRANSFORMERS

"""Packaging: the wheel declares ranges, so it installs beside a different transformers release
without replacing it (exact pins live in constraints.txt, for ./dev)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import urllib.request
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OTHER_TRANSFORMERS = "5.23.0"  # the suite itself runs 5.24.0 (constraints.txt)


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/transformers/", timeout=10)
        return True
    except OSError:
        return False


def test_metadata_declares_ranges_and_constraints_pin_them():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "==" in d], "ranges only in the metadata"
    pinned = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().split()
              if "==" in line}
    for dependency in project["dependencies"]:
        name = dependency.split(">")[0].split("<")[0].split("=")[0].strip().lower()
        assert name.replace("_", "-") in {p.replace("_", "-") for p in pinned}, name


@pytest.mark.slow
@pytest.mark.skipif(not pypi_reachable(), reason="needs the PyPI registry")
def test_wheel_installs_beside_another_transformers_version(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(dist)], check=True)
    wheel = next(dist.glob("distillspec-*.whl"))
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

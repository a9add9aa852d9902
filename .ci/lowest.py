"""Print pip constraints that pin every direct dependency of pyproject.toml (extras included)
at its lowest allowed version: ``name>=X`` becomes ``name==X`` (uv's ``--resolution
lowest-direct``, with pip). Transitive dependencies stay free, as they are for a user.

    python .ci/lowest.py [--except NAME ...] > lowest.txt
    python .ci/lowest.py --check [--except NAME ...]   # in the installed environment: exit 1
                                                        # unless each floor is what is installed
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def floors(pyproject: dict) -> dict[str, str]:
    """{normalised name: lowest version} of every direct dependency and extra."""
    project = pyproject["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    found: dict[str, str] = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement.split(";")[0])
        if match is None:
            raise ValueError(f"cannot parse the requirement {requirement!r} in pyproject.toml")
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        lows = re.findall(r">=\s*([0-9][^,\s]*)", match.group(3))
        if len(lows) != 1:
            raise ValueError(f"{requirement!r} needs exactly one '>=' floor, so it can be tested")
        if found.get(name, lows[0]) != lows[0]:
            raise ValueError(f"{name} has two floors: {found[name]} and {lows[0]}")
        found[name] = lows[0]
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--except", dest="skip", action="append", default=[],
                        help="a dependency to leave out (installed by hand before)")
    parser.add_argument("--check", action="store_true",
                        help="compare the floors with the versions installed here")
    args = parser.parse_args(argv)
    skip = {re.sub(r"[-_.]+", "-", name).lower() for name in args.skip}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {name: version for name, version in sorted(floors(pyproject).items())
              if name not in skip}
    if not args.check:
        for name, version in wanted.items():
            print(f"{name}=={version}")
        return 0
    import importlib.metadata

    from packaging.version import Version

    wrong = []
    for name, version in wanted.items():
        installed = importlib.metadata.version(name)
        wrong += [] if Version(installed) == Version(version) else [f"{name} {installed}"]
        print(f"floors: {name} {installed} (floor {version})")
    if wrong:
        print(f"floors: not at the floor: {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Render an eval folder's eval.md and lenience plots again from its eval.json.

For an eval run by an older distillspec (before eval.md had its lenience section and the run
wrote quality_speed.png): the figures come from eval.json unchanged; only the rendering is new.

    python benchmarks/render_eval.py runs/qwen/eval-lossy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillspec.common.io import atomic_write_text
from distillspec.tools.eval_quality import markdown_report, write_plots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an eval output folder holding eval.json")
    folder = parser.parse_args().folder
    source = folder / "eval.json"
    if not source.is_file():
        raise SystemExit(f"{source} does not exist: give a folder written by distillspec eval.")
    report = json.loads(source.read_text())
    for entry in report["setups"]:
        # before 779b874 an entry named its draft's role "draft" ("draft", "compare" or None)
        entry.setdefault("draft_role", entry.get("draft"))
    atomic_write_text(folder / "eval.md", markdown_report(report))
    written = write_plots(report, lambda name: folder / name)
    print(f"wrote {folder}/eval.md" + "".join(f", {name}" for name in written))


if __name__ == "__main__":
    main()

"""Render an eval folder's eval.md and lenience plots again from its eval.json.

For an eval run by an older distillspec (before eval.md had its lenience section and the run
wrote quality_speed.png): the figures come from eval.json unchanged; only the rendering is new.
A run from before the lenience choice gets it computed from its samples.jsonl, in eval.md only
(eval.json is left as the run wrote it).

    python benchmarks/render_eval.py runs/qwen/eval-lossy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillspec.common.io import atomic_write_text
from distillspec.tools.eval_config import EvalConfig
from distillspec.tools.eval_quality import lenience_choice, markdown_report, write_plots


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
    samples = folder / "samples.jsonl"
    if "lenience_choice" not in report and samples.is_file():
        # before the lenience choice existed: computed from the run's own rows
        tolerance = report["config"].get("quality_tolerance", EvalConfig.quality_tolerance)
        lines = [json.loads(line) for line in samples.read_text().splitlines() if line]
        report["lenience_choice"] = lenience_choice(report, lines, tolerance)
    atomic_write_text(folder / "eval.md", markdown_report(report))
    written = write_plots(report, lambda name: folder / name)
    print(f"wrote {folder}/eval.md" + "".join(f", {name}" for name in written))


if __name__ == "__main__":
    main()

"""Compare two lm-evaluation-harness runs of the same tasks document by document.

    python docs/results/lm-eval/compare.py SERVER_OUT HF_OUT [--json FILE]

SERVER_OUT and HF_OUT are the ``--output_path`` folders of two ``lm_eval ... --log_samples``
runs (here: ``local-completions`` against ``distillspec serve``, and ``hf`` on the same
weights). Prints a Markdown table: each task's metrics in both runs; for log-likelihood tasks
the largest difference of any choice's log-likelihood and the documents whose chosen answer
differs; for generation tasks how many generations are identical, and the ones that are not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_run(folder: Path) -> tuple[dict, dict[str, list[dict]]]:
    """(results of the newest results_*.json, {task: samples sorted by doc_id})."""
    results = sorted(folder.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise SystemExit(f"{folder}: no results_*.json (was lm_eval run with --output_path?)")
    summary = json.loads(results[-1].read_text())
    samples = {}
    for task in summary["results"]:
        files = sorted(folder.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise SystemExit(f"{folder}: no samples for {task} (was lm_eval run with --log_samples?)")
        rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line]
        samples[task] = sorted(rows, key=lambda row: row["doc_id"])
    return summary["results"], samples


def compare_task(task: str, left: list[dict], right: list[dict]) -> dict:
    if [s["doc_id"] for s in left] != [s["doc_id"] for s in right]:
        raise SystemExit(f"{task}: the two runs scored different documents")
    first = left[0]["resps"][0][0]
    if isinstance(first, str):  # generate_until: one text per document
        texts = [(a["filtered_resps"][0], b["filtered_resps"][0]) for a, b in zip(left, right)]
        differ = [{"doc_id": a["doc_id"], "left": x, "right": y}
                  for a, (x, y) in zip(left, texts) if x != y]
        return {"task": task, "kind": "generation", "docs": len(left),
                "identical": len(left) - len(differ), "differ": differ}
    deltas, flips = [], []
    for a, b in zip(left, right):
        x = [float(r[0][0]) for r in a["resps"]]
        y = [float(r[0][0]) for r in b["resps"]]
        deltas += [abs(p - q) for p, q in zip(x, y)]
        if max(range(len(x)), key=x.__getitem__) != max(range(len(y)), key=y.__getitem__):
            ranked = sorted(y, reverse=True)
            flips.append({"doc_id": a["doc_id"], "left": x, "right": y,
                          "right_margin": ranked[0] - ranked[1]})
    return {"task": task, "kind": "loglikelihood", "docs": len(left), "choices": len(deltas),
            "max_abs_diff": max(deltas), "mean_abs_diff": sum(deltas) / len(deltas),
            "argmax_differs": flips}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("left", type=Path, help="--output_path of the first run (the server)")
    parser.add_argument("right", type=Path, help="--output_path of the second run (hf)")
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    parser.add_argument("--labels", default="server,hf", help="the two runs' column names")
    args = parser.parse_args()
    (left_results, left), (right_results, right) = load_run(args.left), load_run(args.right)
    names = args.labels.split(",")
    rows = []
    for task in sorted(set(left) & set(right)):
        row = compare_task(task, left[task], right[task])
        row["metrics"] = {name: [left_results[task][name], right_results[task][name]]
                          for name in left_results[task]
                          if name.endswith(",none") and "stderr" not in name}
        rows.append(row)
    print(f"| task | metric | {names[0]} | {names[1]} | agreement |")
    print("|---|---|---|---|---|")
    for row in rows:
        if row["kind"] == "generation":
            agree = f"{row['identical']}/{row['docs']} generations identical"
        else:
            agree = (f"max abs Δ log-likelihood {row['max_abs_diff']:.2e} over {row['choices']} "
                     f"choices; answer differs on {len(row['argmax_differs'])}/{row['docs']}")
        for name, (x, y) in row["metrics"].items():
            print(f"| {row['task']} | {name.removesuffix(',none')} | {x:.4f} | {y:.4f} | {agree} |")
    for row in rows:
        for item in row.get("differ", []) + row.get("argmax_differs", []):
            print(f"{row['task']} doc {item['doc_id']}: {names[0]} {item['left']!r}, "
                  f"{names[1]} {item['right']!r}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The cost of a draft step: c = draft step / target step for layers x head size, and the
target's verify curve V(k), measured through the engine's code paths (``measure_cost_model``).

Not a test. For SmolLM2-135M, drafts of its first N layers with a K-token pruned head (K = the
full 49152 or fewer; timing does not depend on which ids are kept). Medians of ``--repeats``
calls after a warm-up, batch 1, in the dtype given (auto: bf16 where the CPU has it natively).

    python benchmarks/bench_draft_cost.py --out docs/results/draft-cost.json
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from distillspec.common.io import atomic_write_json, atomic_write_text
from distillspec.decoding.measure import measure_cost_model
from distillspec.models.drafts import truncate_layers
from distillspec.models.loading import load_model
from distillspec.models.pruned_head import prune_head


def copy_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes/s of a large tensor copy (read + write counted once each), median of ``repeats``.

    A write may also cost a read of the destination line (write-allocate), so the real traffic
    can be up to 1.5x this figure: the weight-read floor derived from it is an upper bound and
    step / floor a lower bound."""
    import statistics
    import time

    source = torch.empty(megabytes * 2**20, dtype=torch.uint8).fill_(1)
    target = torch.empty_like(source)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        target.copy_(source)
        seconds.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(seconds[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,2,3,4,6")
    parser.add_argument("--heads", default="49152,16384,8192,4096")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("docs/results/draft-cost.json"))
    args = parser.parse_args(argv)
    target, _ = load_model("builtin:smollm2-135m", device="cpu", dtype=args.dtype)
    cost = measure_cost_model(target, None, max_verify=9, repeats=args.repeats)
    vocab = target.get_input_embeddings().weight.shape[0]
    rows = []
    for layers in (int(n) for n in args.layers.split(",")):
        for head in (int(k) for k in args.heads.split(",")):
            draft = truncate_layers(target, layers)
            if head < vocab:
                prune_head(draft, torch.arange(head))
            step = measure_cost_model(draft, None, max_verify=1, repeats=args.repeats).target_step_s
            rows.append({"layers": layers, "head": head, "draft_step_ms": step * 1000,
                         "cost_ratio": step / cost.target_step_s})
            print(f"{layers} layers, head {head}: {step * 1000:.2f} ms, c = "
                  f"{step / cost.target_step_s:.3f}", flush=True)
            del draft
    bandwidth = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    weight_floor_s = weight_bytes / bandwidth  # a step must read every weight once
    report = {
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "step_over_weight_floor": cost.target_step_s / weight_floor_s,
        "command": "python benchmarks/bench_draft_cost.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"processor": platform.processor(), "threads": torch.get_num_threads(),
                    "dtype": str(target.dtype), "torch": torch.__version__},
        "target_step_ms": cost.target_step_s * 1000,
        "verify_curve": cost.to_dict()["verify_curve"],
        "rows": rows,
    }
    atomic_write_json(args.out, report)
    heads = sorted({r["head"] for r in rows}, reverse=True)
    lines = ["| layers | " + " | ".join(f"head {h}" for h in heads) + " |",
             "|---|" + "---|" * len(heads)]
    for layers in sorted({r["layers"] for r in rows}):
        cells = [next(f"{r['cost_ratio']:.3f} ({r['draft_step_ms']:.1f} ms)" for r in rows
                      if r["layers"] == layers and r["head"] == h) for h in heads]
        lines.append(f"| {layers} | " + " | ".join(cells) + " |")
    curve = ", ".join(f"V({k}) = {v:.2f}" for k, v in report["verify_curve"].items())
    lines += ["", f"Target step {report['target_step_ms']:.1f} ms ({report['machine']['dtype']}); "
              f"verify curve: {curve}.",
              f"Weights {report['weight_bytes'] / 1e6:.0f} MB at a measured copy bandwidth of "
              f"{report['copy_bandwidth_gb_s']:.1f} GB/s: target step / weight-read floor = "
              f"{report['step_over_weight_floor']:.2f}."]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

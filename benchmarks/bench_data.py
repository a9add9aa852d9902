"""Data options for distilling the SmolLM2 draft: alpha per minute of training, side by side.

Not a test. Each variant distils the same draft (``--draft``) for ``--minutes`` of training and
records held-out greedy alpha (``builtin:chat:heldout``) against training time:

* ``handwritten-cached``: the ~100 hand-written training prompts (``builtin:chat``), the target's
  greedy answers generated once (the fixed policy on a cached datagen file);
* ``pool-cached``: ``--pool`` prompts the target wrote itself (Magpie), answers generated once;
* ``pool-live``: the same prompts, the target answering every step (policy teacher, no cache);
* ``pool-topk``: like pool-cached, with the target's top-k log-probs cached too (no target
  forward per step, ``teacher_topk``).

The pool and its answers are the demo's cached training data (generated on first use; the
time it took is reported). Writes JSON and a PNG of the curves.

    python benchmarks/bench_data.py --minutes 6 --out docs/results/data-options
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from distillspec.common.config import from_dict, replace, to_dict
from distillspec.common.io import atomic_write_json
from distillspec.models.loading import load_model
from distillspec.tools.configs import DemoConfig
from distillspec.tools.demo import demo_data
from distillspec.training.loop import distill

VARIANTS = ("handwritten-cached", "pool-cached", "pool-live", "pool-topk")


def curves(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{"minutes": r["train_seconds"] / 60, "step": r["step"], "alpha_t0": r["alpha_t0"],
             "alpha_t1": r["alpha_t1"]} for r in records if "eval" in r]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--pool", type=int, default=2048)
    parser.add_argument("--draft", default="target-layers:4:vocab=8192")
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("docs/results/data-options"))
    args = parser.parse_args(argv)
    demo = from_dict(DemoConfig, {"prompt_pool": args.pool})
    target, tokenizer = load_model(demo.distill.target)
    pool = demo_data(demo, target, tokenizer)
    handwritten = demo_data(replace(demo, prompt_pool=0), target, tokenizer)
    del target
    base = replace(demo.distill, draft_init=args.draft, max_minutes=args.minutes, resume=False,
                   eval_every=30, save_every=0)
    recipes = {
        "handwritten-cached": replace(base, data=str(handwritten.answers), policy="fixed"),
        "pool-cached": replace(base, data=str(pool.answers), policy="fixed"),
        "pool-live": replace(base, data=str(pool.prompts), policy="teacher",
                             sample_temperature=0.0),
        "pool-topk": replace(base, data=str(pool.answers), policy="fixed",
                             teacher_topk=args.topk),
    }
    report = {"command": "python benchmarks/bench_data.py " + " ".join(argv or sys.argv[1:]),
              "data_generation_minutes": {"pool": pool.generation_minutes,
                                          "handwritten": handwritten.generation_minutes},
              "variants": {}}
    with tempfile.TemporaryDirectory(prefix="distillspec-data-") as work:
        for name in args.variants.split(","):
            run = Path(work) / name
            final = distill(replace(recipes[name], output_dir=str(run)))
            report["variants"][name] = {"config": to_dict(recipes[name]), "final": final,
                                        "curve": curves(run)}
            print(name, json.dumps(final), flush=True)
            atomic_write_json(args.out / "data-options.json", report)
    plot(report, args.out / "alpha_per_minute.png")
    print(f"wrote {args.out}")
    return 0


def plot(report: dict, path: Path) -> None:
    from distillspec.tools.plots import _pyplot

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for name, variant in report["variants"].items():
        curve = variant["curve"]
        axis.plot([c["minutes"] for c in curve], [c["alpha_t0"] for c in curve], "o-", ms=3,
                  label=name)
    axis.set_xlabel("training minutes")
    axis.set_ylabel("held-out greedy alpha (T=0)")
    axis.set_title("Distilling SmolLM2's 4-layer draft: data options")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())

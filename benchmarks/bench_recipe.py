"""Recipe variants for the demo's draft: held-out alpha after a few minutes of training each.

Not a test. Every variant distils from the demo's cached data (the 1024 Magpie prompts and the
target's greedy answers; generated on first use) with the cached teacher top-k (``teacher_topk``
32, scored once into ``--topk-dir``) for ``--minutes`` of training, then records:

* held-out greedy alpha on ``builtin:chat:heldout`` (the trainer's own evaluation), and
* greedy alpha on 32 prompts of the 2048-prompt pool that the 1024-prompt training pool does not
  contain (``--unseen``: prompts 1500..1531 of that pool), a second, larger held-out set.

Variants are JSON: name -> DistillConfig overrides, e.g.

    python benchmarks/bench_recipe.py --minutes 3.5 \\
        --variants '{"L4-lr1e-3": {}, "L4-lr3e-3": {"lr": 0.003}}' --out docs/results/draft-recipe
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from distillspec.common.config import from_dict, replace
from distillspec.common.io import atomic_write_json, read_jsonl
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.tools.configs import DemoConfig
from distillspec.tools.demo import demo_data
from distillspec.training.datasets import load_examples
from distillspec.training.evaluate import SDEvaluator
from distillspec.training.loop import distill


def unseen_evaluator(target, tokenizer, unseen: Path) -> SDEvaluator:
    examples = load_examples(str(unseen), tokenizer, max_prompt_tokens=128)[1500:1532]
    return SDEvaluator(target, [e.prompt_ids for e in examples], max_new_tokens=64,
                       tau_prompts=0, gamma=1, eos_token_id=eos_token_ids(target, tokenizer),
                       seed=0, pad_id=pad_token_id(tokenizer))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.5)
    parser.add_argument("--variants", required=True, help="JSON: name -> DistillConfig overrides")
    parser.add_argument("--topk-dir", default="/tmp/distillspec-topk")
    parser.add_argument("--out", type=Path, default=Path("docs/results/draft-recipe"))
    args = parser.parse_args(argv)
    demo = from_dict(DemoConfig, {"prompt_pool": 1024})
    target, tokenizer = load_model(demo.distill.target)
    data = demo_data(demo, target, tokenizer)
    unseen = demo_data(replace(demo, prompt_pool=2048), target, tokenizer).prompts
    evaluator = unseen_evaluator(target, tokenizer, unseen)
    base = replace(demo.distill, draft_init="target-layers:4:vocab=8192", lr=1e-3,
                   max_minutes=args.minutes, resume=False, eval_every=60, save_every=0,
                   data=str(data.answers), policy="fixed", teacher_topk=32,
                   teacher_topk_dir=args.topk_dir)
    path = args.out / "recipe.json"
    report = json.loads(path.read_text()) if path.is_file() else {"variants": {}}
    report["command"] = "python benchmarks/bench_recipe.py " + " ".join(argv or sys.argv[1:])
    for name, overrides in json.loads(args.variants).items():
        with tempfile.TemporaryDirectory(prefix="distillspec-recipe-") as work:
            config = replace(base, output_dir=f"{work}/run", **overrides)
            start = time.time()
            final = distill(config)
            records = [record for _, record in read_jsonl(f"{work}/run/metrics.jsonl")]
            curve = [(r["step"], round(r["train_seconds"] / 60, 2), round(r["alpha_t0"], 3))
                     for r in records if "eval" in r]
            draft, _ = load_model(f"{work}/run/final", device=target.device, dtype=target.dtype)
            report["variants"][name] = {
                "overrides": overrides, "final": final, "curve": curve,
                "unseen_pool": evaluator.alpha(draft), "wall_seconds": time.time() - start,
            }
        print(name, json.dumps(report["variants"][name]["final"]), flush=True)
        atomic_write_json(path, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

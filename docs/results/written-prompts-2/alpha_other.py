"""alpha (T=0, T=1) of a distilled draft on a prompt file, as the demo measures it.
    python alpha_other.py runs/demo/run/final docs/results/written-prompts-2/other-eval.jsonl
"""
import json
import sys
import time
from pathlib import Path

from distillspec.common.config import from_dict, replace
from distillspec.common.io import atomic_write_json, read_jsonl
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.tools.configs import DemoConfig
from distillspec.training.datasets import load_examples
from distillspec.training.evaluate import SDEvaluator
from distillspec.training.loop import distill

HERE = Path(__file__).resolve().parent


def ab_setup(minutes: float, **overrides):
    """The later A/Bs' common start: the demo's target (loaded once), its recipe for a timed arm
    scored on choice99 (the chat set minus the demo's report split), and the evaluator of the
    77 requests written apart. Returns (target, tokenizer, base config, evaluator)."""
    demo = from_dict(DemoConfig, {})
    target, tokenizer = load_model(demo.distill.target)
    base = replace(demo.distill, max_minutes=minutes, max_steps=100000,
                   eval_data=str(HERE / "choice99.jsonl"), eval_prompts=99, eval_tau_prompts=0,
                   eval_max_new_tokens=64, eval_every=0, save_every=0, overwrite=True,
                   resume=False, **overrides)
    return target, tokenizer, base, alpha_evaluator(target, tokenizer, HERE / "other-eval.jsonl")


def alpha_evaluator(target, tokenizer, prompts):
    """alpha on the target's greedy 64-token answers to ``prompts`` (the demo's measurement)."""
    examples = load_examples(str(prompts), tokenizer, max_prompt_tokens=128)
    return SDEvaluator(target, [e.prompt_ids for e in examples], max_new_tokens=64,
                       tau_prompts=0, gamma=1, eos_token_id=eos_token_ids(target, tokenizer),
                       seed=0, pad_id=pad_token_id(tokenizer))


def train_arm(config, target, tokenizer, evaluator):
    """Distil one A/B arm's draft (``config``); its data, steps, wall time and alpha on the
    trainer's eval set (choice99) and on ``evaluator``'s prompts (other-eval)."""
    start = time.time()
    final = distill(config, target=target, tokenizer=tokenizer)
    records = [r for _, r in read_jsonl(f"{config.output_dir}/metrics.jsonl")]
    draft, _ = load_model(f"{config.output_dir}/final", device=target.device, dtype=target.dtype)
    return {"data": config.data, "lines": len(Path(config.data).read_text().splitlines()),
            "choice99": final, "other_eval": evaluator.alpha(draft),
            "steps": max(r.get("step", 0) for r in records), "wall_seconds": time.time() - start}


def run_arms(path: Path, header: dict, arms, target, tokenizer, evaluator) -> None:
    """Train each ``(name, config, fields)`` of ``arms`` in turn and keep its record (``fields``
    plus ``train_arm``'s) in the JSON report at ``path``, rewritten after every arm so a killed
    A/B keeps the arms it finished; ``header``: the report's run-wide fields."""
    report = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    report.update(header)
    for name, config, fields in arms:
        report["arms"][name] = {**fields, **train_arm(config, target, tokenizer, evaluator)}
        print(name, json.dumps(report["arms"][name]), flush=True)
        atomic_write_json(path, report)


def run_cached_ab(path: Path, minutes: float, arm, names, **overrides) -> None:
    """An A/B on the demo's cached data (env DATA: answers.jsonl, TOPK: its top-k folder):
    ``ab_setup`` with ``overrides``, then ``run_arms`` over ``arm(base, name)`` for each of
    ``names``, the report at ``path`` with the arms' minutes."""
    import os

    target, tokenizer, base, other = ab_setup(
        minutes, data=os.environ["DATA"], teacher_topk_dir=os.environ["TOPK"], **overrides)
    run_arms(path, {"minutes": minutes}, (arm(base, name) for name in names), target,
             tokenizer, other)


if __name__ == "__main__":
    draft_path, prompts = sys.argv[1], sys.argv[2]
    target, tokenizer = load_model("builtin:smollm2-135m")
    draft, _ = load_model(draft_path, device=target.device, dtype=target.dtype)
    evaluator = alpha_evaluator(target, tokenizer, prompts)
    print(json.dumps({"draft": draft_path, "prompts": prompts,
                      "count": len(evaluator.prompts), "dtype": str(target.dtype),
                      **evaluator.alpha(draft)}))

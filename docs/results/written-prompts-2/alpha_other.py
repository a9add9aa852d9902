"""alpha (T=0, T=1) of a distilled draft on a prompt file, as the demo measures it.
    python alpha_other.py runs/demo/run/final docs/results/written-prompts-2/other-eval.jsonl
"""
import json
import sys
import time
from pathlib import Path

from distillspec.common.io import read_jsonl
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.training.datasets import load_examples
from distillspec.training.evaluate import SDEvaluator
from distillspec.training.loop import distill


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


if __name__ == "__main__":
    draft_path, prompts = sys.argv[1], sys.argv[2]
    target, tokenizer = load_model("builtin:smollm2-135m")
    draft, _ = load_model(draft_path, device=target.device, dtype=target.dtype)
    evaluator = alpha_evaluator(target, tokenizer, prompts)
    print(json.dumps({"draft": draft_path, "prompts": prompts,
                      "count": len(evaluator.prompts), "dtype": str(target.dtype),
                      **evaluator.alpha(draft)}))

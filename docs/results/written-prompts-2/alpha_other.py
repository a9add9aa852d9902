"""alpha (T=0, T=1) of a distilled draft on a prompt file, as the demo measures it.
    python alpha_other.py runs/demo/run/final docs/results/written-prompts-2/other-eval.jsonl
"""
import json
import sys

from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.training.datasets import load_examples
from distillspec.training.evaluate import SDEvaluator


def alpha_evaluator(target, tokenizer, prompts):
    """alpha on the target's greedy 64-token answers to ``prompts`` (the demo's measurement)."""
    examples = load_examples(str(prompts), tokenizer, max_prompt_tokens=128)
    return SDEvaluator(target, [e.prompt_ids for e in examples], max_new_tokens=64,
                       tau_prompts=0, gamma=1, eos_token_id=eos_token_ids(target, tokenizer),
                       seed=0, pad_id=pad_token_id(tokenizer))


if __name__ == "__main__":
    draft_path, prompts = sys.argv[1], sys.argv[2]
    target, tokenizer = load_model("builtin:smollm2-135m")
    draft, _ = load_model(draft_path, device=target.device, dtype=target.dtype)
    evaluator = alpha_evaluator(target, tokenizer, prompts)
    print(json.dumps({"draft": draft_path, "prompts": prompts,
                      "count": len(evaluator.prompts), "dtype": str(target.dtype),
                      **evaluator.alpha(draft)}))

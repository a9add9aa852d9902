"""alpha (T=0, T=1) of a distilled draft on a prompt file, as the demo measures it.
    python alpha_other.py runs/demo/run/final docs/results/written-prompts-2/other-eval.jsonl
"""
import json
import sys

from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.training.datasets import load_examples
from distillspec.training.evaluate import SDEvaluator

draft_path, prompts = sys.argv[1], sys.argv[2]
target, tokenizer = load_model("builtin:smollm2-135m")
draft, _ = load_model(draft_path, device=target.device, dtype=target.dtype)
examples = load_examples(prompts, tokenizer, max_prompt_tokens=128)
evaluator = SDEvaluator(target, [e.prompt_ids for e in examples], max_new_tokens=64, tau_prompts=0,
                        gamma=1, eos_token_id=eos_token_ids(target, tokenizer), seed=0,
                        pad_id=pad_token_id(tokenizer))
print(json.dumps({"draft": draft_path, "prompts": prompts, "count": len(examples),
                  "dtype": str(target.dtype), **evaluator.alpha(draft)}))

"""Teacher-forced alpha (T = 0 and T = 1) of two drafts of one target on the same target answers.

The engine's alpha at T = 1 comes from each draft's own SD run, so the two drafts see different
samples; here both score the same target answers (greedy, and seeded T = 1 samples), as the
trainer's evaluation does, one prompt file after another:

    python alpha_pair.py TARGET DRAFT_A DRAFT_B OUT.json PROMPTS [PROMPTS ...]
"""
import json
import sys
import time

from distillspec.common.io import atomic_write_json
from distillspec.models.loading import eos_token_ids, load_model, pad_token_id
from distillspec.training.datasets import load_examples
from distillspec.training.evaluate import SDEvaluator


def main(target_name: str, drafts: list[str], out: str, prompt_files: list[str]) -> None:
    target, tokenizer = load_model(target_name)
    models = {name: load_model(name, device=target.device, dtype=target.dtype)[0]
              for name in drafts}
    report = {"target": target_name, "dtype": str(target.dtype), "max_new_tokens": 64,
              "max_prompt_tokens": 128, "seed": 0, "prompts": {}}
    for prompts in prompt_files:
        start = time.time()
        examples = load_examples(prompts, tokenizer, max_prompt_tokens=128)
        evaluator = SDEvaluator(target, [e.prompt_ids for e in examples], max_new_tokens=64,
                                tau_prompts=0, gamma=1, eos_token_id=eos_token_ids(target, tokenizer),
                                seed=0, pad_id=pad_token_id(tokenizer))
        report["prompts"][prompts] = {"count": len(examples), **{
            name: evaluator.alpha(model) for name, model in models.items()},
            "seconds": time.time() - start}
        print(prompts, json.dumps(report["prompts"][prompts]), flush=True)
        atomic_write_json(out, report)


if __name__ == "__main__":
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:4], sys.argv[4], sys.argv[5:])

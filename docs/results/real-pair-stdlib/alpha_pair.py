"""Teacher-forced alpha (T = 0 and T = 1) of two drafts of one target on the same target answers.

The engine's alpha at T = 1 comes from each draft's own SD run, so the two drafts see different
samples; here both score the same target answers (greedy, and seeded T = 1 samples, 64 tokens),
with the trainer's own evaluator (``setup.make_evaluator``), one prompt file after another:

    python alpha_pair.py TARGET DRAFT_A DRAFT_B OUT.json PROMPTS [PROMPTS ...]
"""
import json
import sys
import time

from distillspec.common.config import replace
from distillspec.common.io import atomic_write_json
from distillspec.models.loading import load_model
from distillspec.training.config import DistillConfig
from distillspec.training.setup import held_out_examples, make_evaluator


def main(target_name: str, drafts: list[str], out: str, prompt_files: list[str]) -> None:
    target, tokenizer = load_model(target_name)
    models = {name: load_model(name, device=target.device, dtype=target.dtype)[0]
              for name in drafts}
    report = {"target": target_name, "dtype": str(target.dtype), "max_new_tokens": 64,
              "max_prompt_tokens": 128, "seed": 0, "prompts": {}}
    for prompts in prompt_files:
        start = time.time()
        config = DistillConfig(target=target_name, eval_data=prompts, max_prompt_tokens=128,
                               eval_max_new_tokens=64, eval_tau_prompts=0, seed=0)
        examples = held_out_examples(config, tokenizer)
        config = replace(config, eval_prompts=len(examples))  # every prompt of the file
        evaluator = make_evaluator(config, target, tokenizer, examples)
        report["prompts"][prompts] = {"count": len(examples), **{
            name: evaluator.alpha(model) for name, model in models.items()},
            "seconds": time.time() - start}
        print(prompts, json.dumps(report["prompts"][prompts]), flush=True)
        atomic_write_json(out, report)


if __name__ == "__main__":
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:4], sys.argv[4], sys.argv[5:])

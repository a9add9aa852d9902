"""Go/no-go, step 1: the target's greedy 64-token answers on three prompt sets, with the
draft's top-12 and the target's argmax per column (teacher-forced), for gonogo_sim.py.

    python gonogo_rows.py DRAFT_FOLDER        (from the repository root; writes /tmp/ng/rows.json)
"""

import json
import os
import sys

import torch

from distillspec.common.config import replace
from distillspec.models.loading import load_model
from distillspec.training.config import DEFAULT_TARGET, DistillConfig
from distillspec.training.setup import held_out_examples, make_evaluator

SPLITS = {"choice": "builtin:chat:heldout", "report": "builtin:chat:train",
          "other": "docs/results/written-prompts-2/other-eval.jsonl"}


def main(draft_dir):
    torch.manual_seed(0)
    target, tokenizer = load_model(DEFAULT_TARGET)
    draft = load_model(draft_dir, device=target.device, dtype=target.dtype)[0]
    rows = {}
    with torch.inference_mode():
        for split, spec in SPLITS.items():
            config = DistillConfig(eval_data=spec, max_prompt_tokens=128, eval_max_new_tokens=64,
                                   eval_tau_prompts=0, seed=0)
            examples = held_out_examples(config, tokenizer)
            config = replace(config, eval_prompts=len(examples))
            evaluator = make_evaluator(config, target, tokenizer, examples)
            out = []
            for batch, target_logits in zip(evaluator.batches[0.0], evaluator.target_logits[0.0]):
                draft_top = evaluator._logits(draft, batch).topk(12, -1).indices
                target_ids = target_logits.argmax(-1)
                for r in range(batch.input_ids.shape[0]):
                    columns = batch.loss_mask[r].nonzero().flatten().tolist()
                    if not columns:
                        continue
                    real = batch.attention_mask[r].nonzero().flatten().tolist()
                    out.append({"ids": batch.input_ids[r].tolist(), "start": real[0],
                                "first": columns[0], "last": columns[-1],
                                "draft": draft_top[r].tolist(), "target": target_ids[r].tolist()})
            rows[split] = out
            print(split, len(out), flush=True)
    os.makedirs("/tmp/ng", exist_ok=True)
    with open("/tmp/ng/rows.json", "w") as handle:
        json.dump(rows, handle)


if __name__ == "__main__":
    main(sys.argv[1])

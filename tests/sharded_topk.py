"""Score a tiny target's top-k on fixed examples with ``teacher_topk.build`` on every rank of a
torchrun launch; used by test_scale.py, not collected:
    torchrun --nproc_per_node 2 tests/sharded_topk.py MODEL_DIR CACHE_FILE
``topk_inputs`` is also what the test scores in one process to compare.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from distillspec.training.datasets import PromptExample

K, BATCH, SHARD_BATCHES = 8, 2, 1


def topk_inputs(count: int = 7, vocab: int = 96):
    """Examples with completions of different lengths, and the completions by source."""
    rng = random.Random(0)
    examples = [PromptExample([1] + [rng.randrange(4, vocab) for _ in range(rng.randrange(1, 6))],
                              None, f"t.jsonl:{i + 1}") for i in range(count)]
    completions = {e.source: [rng.randrange(4, vocab) for _ in range(rng.randrange(1, 7))]
                   for e in examples}
    return examples, completions


if __name__ == "__main__":
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    from distillspec.training import teacher_topk

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    model_dir, cache = sys.argv[1], Path(sys.argv[2])
    target = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    examples, completions = topk_inputs()
    found = teacher_topk.build(target, examples, completions, K, cache, batch_size=BATCH,
                               shard_batches=SHARD_BATCHES, ranks=state)
    assert list(found) == [e.source for e in examples]  # every rank gets the whole cache

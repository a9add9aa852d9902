"""Where a decoding step's time goes: target forwards, draft forwards and the rest (host work:
the acceptance rule, sampling, caches), per step, for one SD setting at batch 1.

    python phase.py DRAFT TREE TEMPERATURE

The default target (SmolLM2-135M), compiled steps, the first 4 prompts of the demo's report
split (builtin:chat:train) × 48 tokens, seeded; two warm-up passes, then two timed passes, each
printed. Run it once per code version (ab.sh alternates two checkouts through PYTHONPATH).
"""

import sys
import time
from collections import defaultdict

import torch

from distillspec.common.runtime import apply_threads
from distillspec.decoding import kv_cache
from distillspec.decoding.engine import Decoder
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.decoding.requests import Request
from distillspec.models.loading import eos_token_ids
from distillspec.tools.configs import ServeConfig
from distillspec.tools.generate import load_for_decoding
from distillspec.training.builtin_data import builtin_dataset_items


def prompts_of(tokenizer) -> list[list[int]]:
    prompts = []
    for item in builtin_dataset_items("builtin:chat:train")[:4]:
        record = item.record or {}
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts


def main() -> None:
    draft_path, tree, temperature = sys.argv[1], sys.argv[2], float(sys.argv[3])
    config = ServeConfig()
    apply_threads(config.runtime)
    target, draft, tokenizer, _ = load_for_decoding(config.target, draft_path, config.runtime,
                                                    "on", 1)
    stop, prompts = frozenset(eos_token_ids(target, tokenizer)), prompts_of(tokenizer)
    speculation = SpeculationConfig(gamma=2, tree=tree)
    sampling = SamplingConfig(temperature=temperature)
    spent: dict[str, float] = defaultdict(float)
    forward = kv_cache.CachedModel.forward

    def timed_forward(self, *args, **kwargs):
        start = time.perf_counter()
        out = forward(self, *args, **kwargs)
        spent["target" if self.model is target else "draft"] += time.perf_counter() - start
        return out

    kv_cache.CachedModel.forward = timed_forward

    def run() -> tuple[int, list[float]]:
        decoder = Decoder(target, draft, speculation, generator=torch.Generator().manual_seed(0))
        emitted, steps = 0, []
        for index, prompt in enumerate(prompts):
            decoder.add(Request(prompt, 48, sampling, stop, None, index))
            while decoder.has_work:
                start = time.perf_counter()
                updates = decoder.step()
                steps.append(time.perf_counter() - start)
                emitted += sum(len(update.new_tokens) for update in updates)
                decoder.finished.clear()
        return emitted, steps

    run(), run()  # warm-up: every compiled shape
    for _ in range(2):
        spent.clear()
        start = time.perf_counter()
        emitted, steps = run()
        wall, count, total = time.perf_counter() - start, len(steps), sum(steps)
        rest = total - spent["target"] - spent["draft"]
        print(f"{tree} T={temperature}: {emitted / wall:.1f} tok/s, {count} steps, per step: "
              f"total {1e3 * total / count:.2f} ms, target fwd {1e3 * spent['target'] / count:.2f}, "
              f"draft fwd {1e3 * spent['draft'] / count:.2f}, rest {1e3 * rest / count:.2f}",
              flush=True)


if __name__ == "__main__":
    main()

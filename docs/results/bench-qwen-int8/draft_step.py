"""One process, side by side: the Qwen pair's draft (the 0.5B as shipped + 16k pruned head) with
bf16 weights and with int8 weights (`quantize_draft`, what --draft-quantize int8 does): the
median one-token step through CachedModel (the engine's path) and the teacher-forced acceptance
against the 1.5B on the target's answers to 12 HumanEval training tasks (alpha_t0: argmax
agreement, alpha_t1: sum of min(p, q))."""

import copy
import json
import statistics
import time

import torch

from distillspec.decoding.kv_cache import CachedModel
from distillspec.models.loading import load_pair
from distillspec.models.quantize import quantize_draft

torch.manual_seed(0)
target, draft, tokenizer = load_pair("builtin:qwen2.5-coder-1.5b", "qwen-pruned/final",
                                     device="cpu")
drafts = {"bf16": draft, "int8": quantize_draft(copy.deepcopy(draft), "int8")}


@torch.inference_mode()
def step_ms(model, steps: int = 40) -> float:
    cached = CachedModel(model, rows=1, slots=256)
    cached.forward(torch.full((1, 100), tokenizer.eos_token_id), logits_to_keep=1)
    times = []
    for index in range(steps):
        start = time.perf_counter()
        cached.forward(torch.tensor([[100 + index]]), logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:]) * 1000


@torch.inference_mode()
def alphas(model) -> tuple[float, float]:
    greedy, overlap = [], []
    with open("answers.jsonl") as handle:
        records = [json.loads(line) for line in handle][:12]
    for record in records:
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"][:96]
        ids = torch.tensor([prompt + answer])
        span = slice(len(prompt) - 1, -1)
        target_probs = torch.softmax(target(ids).logits[0, span].float(), -1)
        draft_logits = model(ids).logits[0, span].float()
        draft_probs = torch.zeros_like(target_probs)
        draft_probs[:, : draft_logits.shape[-1]] = torch.softmax(draft_logits, -1)
        greedy.append((target_probs.argmax(-1) == draft_probs.argmax(-1)).float())
        overlap.append(torch.minimum(target_probs, draft_probs).sum(-1))
    return torch.cat(greedy).mean().item(), torch.cat(overlap).mean().item()


report = {"target_step_ms": [step_ms(target) for _ in range(2)]}
for _ in range(2):  # interleaved, twice
    for name, model in drafts.items():
        report.setdefault(f"{name}_step_ms", []).append(step_ms(model))
for name, model in drafts.items():
    report[f"{name}_alpha_t0"], report[f"{name}_alpha_t1"] = alphas(model)
print(json.dumps(report, indent=1))
with open("draft_step.json", "w") as out:
    json.dump(report, out, indent=1)

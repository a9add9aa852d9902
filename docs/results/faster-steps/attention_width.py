"""Eager against SDPA attention for one training forward + backward of a 2-layer draft of
SmolLM2-135M (full 49152-token head, bf16 autocast, batch 8, a quarter of each row left-padded,
random ids), by batch width: median of 5 steps, two interleaved rounds. Why train_attention
auto stops at 256 columns (step_timing.json, "attention_by_width_full_head_draft").
"""
import statistics
import time

import torch

from distillspec.training import setup
from distillspec.training.config import DistillConfig


def main() -> None:
    config = DistillConfig(target="builtin:smollm2-135m", draft_init="target-layers:2")
    target, tokenizer = setup.load_target(config)
    draft = setup.trainable_draft(config, target, tokenizer)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], fused=True)

    def step(width: int, kernel: str) -> None:
        draft.config._attn_implementation = kernel
        ids = torch.randint(0, 40000, (8, width))
        mask = torch.ones_like(ids)
        mask[1:, : width // 4] = 0
        positions = (mask.cumsum(1) - 1).clamp(min=0) * mask
        with torch.autocast("cpu", torch.bfloat16):
            logits = draft(input_ids=ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=64).logits
        logits.float().logsumexp(-1).sum().backward()
        optimizer.zero_grad()

    for width in (128, 256, 512, 1024):
        results: dict[str, list[float]] = {}
        for kernel in ("sdpa", "eager") * 2:
            step(width, kernel)
            seconds = []
            for _ in range(5):
                start = time.perf_counter()
                step(width, kernel)
                seconds.append(time.perf_counter() - start)
            results.setdefault(kernel, []).append(round(statistics.median(seconds), 4))
        print(width, results, flush=True)


if __name__ == "__main__":
    main()

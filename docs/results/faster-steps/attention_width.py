import time, torch, statistics
from distillspec.training.config import DistillConfig
from distillspec.training import setup
config = DistillConfig(target="builtin:smollm2-135m", draft_init="target-layers:2")
target, tok = setup.load_target(config)
draft = setup.trainable_draft(config, target, tok)
opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], fused=True)
def step(width, impl):
    draft.config._attn_implementation = impl
    ids = torch.randint(0, 40000, (8, width)); mask = torch.ones_like(ids); mask[:, :width//4] = 0
    mask[0] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0) * mask
    with torch.autocast('cpu', torch.bfloat16):
        logits = draft(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=64).logits
    logits.float().logsumexp(-1).sum().backward(); opt.zero_grad()
for width in (128, 256, 512, 1024):
    res = {}
    for impl in ('sdpa', 'eager') * 2:
        step(width, impl)
        ts = []
        for _ in range(5):
            t = time.perf_counter(); step(width, impl); ts.append(time.perf_counter() - t)
        res.setdefault(impl, []).append(statistics.median(ts))
    print(width, {k: [round(x, 4) for x in v] for k, v in res.items()}, flush=True)

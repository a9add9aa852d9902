"""Where the demo draft's greedy alpha is lost (issue 20, the plateau), teacher-forced along the
target's greedy 64-token answers, as the demo measures alpha_t0:

* out_of_head: the share of the target's tokens that are not among the draft's kept head ids
  (a pruned head can never propose them);
* alpha_given_in_head: alpha on the other tokens;
* topK: the share where the target's token is among the draft's K most likely (what a tree
  with K candidates per position can catch);
* conf[lo,hi): alpha split by the target's own top-1 probability there (how sure it was).

    python diag.py DRAFT_FOLDER [OUT.json]     (e.g. /work/runs/demo-int8/run/final)
"""

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "written-prompts-2"))
from alpha_other import alpha_evaluator  # noqa: E402

from distillspec.decoding.sampling import pad_vocab  # noqa: E402
from distillspec.models.loading import load_model  # noqa: E402

BANDS = [(0, .3), (.3, .5), (.5, .7), (.7, .9), (.9, 1.01)]


def per_token(evaluator, draft, kept):
    """``[4, tokens]``: in head, draft argmax hit, the target token's draft rank, target top-1 p."""
    rows = []
    for batch, target_logits in zip(evaluator.batches[0.0], evaluator.target_logits[0.0]):
        draft_logits = evaluator._logits(draft, batch)
        width = max(draft_logits.shape[-1], target_logits.shape[-1])
        draft_logits, target_logits = pad_vocab(draft_logits, width), pad_vocab(target_logits,
                                                                                width)
        mask = batch.loss_mask.bool()
        target_token = target_logits.argmax(-1)[mask]
        scores = draft_logits[mask]
        rank = (scores > scores.gather(-1, target_token[:, None])).sum(-1)
        in_head = torch.isin(target_token, kept) if kept is not None else torch.ones_like(
            target_token, dtype=torch.bool)
        confidence = target_logits.softmax(-1)[mask].max(-1).values
        rows.append(torch.stack([in_head.float(), (rank == 0).float(), rank.float(), confidence]))
    return torch.cat(rows, 1)


def summary(table):
    in_head, hit, rank, confidence = table
    result = {"tokens": int(table.shape[1]), "alpha_t0": hit.mean().item(),
              "out_of_head": 1 - in_head.mean().item(),
              "alpha_given_in_head": hit[in_head.bool()].mean().item(),
              **{f"top{k}": (rank < k).float().mean().item() for k in (2, 4, 8)}}
    for low, high in BANDS:
        band = (confidence >= low) & (confidence < high)
        result[f"conf[{low},{high})"] = {"share": band.float().mean().item(),
                                         "alpha": hit[band].mean().item()}
    return result


def main(draft_path, out):
    target, tokenizer = load_model("builtin:smollm2-135m")
    draft, _ = load_model(draft_path, device=target.device, dtype=target.dtype)
    kept = getattr(draft.get_output_embeddings(), "token_ids", None)
    report = {"draft": draft_path, "dtype": str(target.dtype), "kept_ids":
              None if kept is None else kept.numel()}
    for name in ["other-eval.jsonl", "choice99.jsonl"]:
        evaluator = alpha_evaluator(target, tokenizer, HERE.parent / "written-prompts-2" / name)
        report[name] = summary(per_token(evaluator, draft, kept))
        print(name, json.dumps(report[name], indent=1), flush=True)
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "diag.json")

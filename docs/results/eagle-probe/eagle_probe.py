"""Probe: does a draft that reads the target's hidden states (EAGLE-3 style) break the alpha plateau?

The demo's draft (the target's first 2 layers) sees tokens only and stops at held-out alpha
~0.37-0.47 however it is trained. An EAGLE-style draft instead reads, at column j, the token x_j
and the target's features at column j-1 (its hidden states after layers 2, 15 and 30, fused), and
runs one decoder layer whose output feeds the target's (pruned) head. Its next chain step reads
its own output in place of the target's features, so acceptance is measured per chain step.

Training (EAGLE-3's "training-time test"): the layer is unrolled ``--unroll`` steps over the whole
sequence at once; step s at column j reads step s-1's output at column j-1 and attends to
step-1 keys at columns <= j-s+1 and to step t's key at column j-s+t (t = 2..s), which is exactly
what the s-th draft token of a chain started at column j-s+1 sees when its s-1 predecessors were
accepted. Loss: cross-entropy of the target's distribution against the draft's over the kept
vocabulary, weighted 0.8**(s-1) per step; the target runs a forward every step (features not
cached). Not in the product: the engine cannot run such a draft yet.

Evaluation on the demo's splits, with the trainer's own evaluator (same target answers, greedy
and T = 1, 64 tokens): analytic alpha per chain step s (= 1 - TVD(p_T, q_T), on the target's
continuation, given the s-1 earlier draft tokens accepted), and greedy SD's tokens per round
(tau) for a chain of gamma, by walking the target's greedy answer round by round (exact for
greedy). A token-only draft has the same alpha at every step (its context is only tokens).

    python eagle_probe.py ANSWERS.jsonl OUT_DIR [--minutes 12] [--unroll 4] [--baseline DRAFT ...]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from distillspec.common.config import replace
from distillspec.common.io import atomic_write_json, read_jsonl
from distillspec.decoding.acceptance import analytic_acceptance
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import warp
from distillspec.models.loading import eos_token_ids, load_model
from distillspec.models.pruned_head import frequent_tokens
from distillspec.training.batch import SequenceBatch, build_batch
from distillspec.training.config import DEFAULT_TARGET, DistillConfig
from distillspec.training.setup import held_out_examples, make_evaluator

FEATURE_LAYERS = (2, 15, 30)  # hidden_states indices: after layer 2, 15, and the final (normed)
SPLITS = {"choice": "builtin:chat:heldout", "report": "builtin:chat:train"}
MAX_STEPS_EVAL = 5


class EagleDraft(nn.Module):
    """fuse(low, mid, high features) -> with the token embedding -> one decoder layer -> norm ->
    the target's head restricted to ``token_ids``. Embedding and head are frozen copies."""

    def __init__(self, target, token_ids: torch.Tensor):
        super().__init__()
        config = target.config
        hidden = config.hidden_size
        self.feature_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)  # raw residual streams
        self.fuse = nn.Linear(len(FEATURE_LAYERS) * hidden, hidden, bias=False)
        self.mix = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.layer.load_state_dict(target.model.layers[-1].state_dict())  # start from its last
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.norm.load_state_dict(target.model.norm.state_dict())
        self.rotary = target.model.rotary_emb
        self.register_buffer("embed", target.get_input_embeddings().weight.detach().float().clone())
        head = target.get_output_embeddings().weight.detach().float()
        self.register_buffer("head", head[token_ids].clone())
        self.register_buffer("token_ids", token_ids.clone())
        self.float()

    def fused(self, hidden_states) -> torch.Tensor:
        parts = [hidden_states[i].float() for i in FEATURE_LAYERS]
        parts = [self.feature_norm(p) if i != FEATURE_LAYERS[-1] else p
                 for i, p in zip(FEATURE_LAYERS, parts)]
        return self.fuse(torch.cat(parts, dim=-1))

    def unrolled(self, batch: SequenceBatch, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Per chain step s (1..steps): the layer's output [B, L, H] at every column j, where step
        s reads x_j and step s-1's output at j-1 (step 0 = the target's fused features)."""
        embedded = self.embed[batch.input_ids]
        length = batch.input_ids.shape[1]
        # Column j reads column j-1's features; nothing where j-1 is a pad (as at batch 1).
        previous_real = nn.functional.pad(batch.attention_mask[:, :-1], (1, 0)).bool()[..., None]
        inputs, outputs, previous = [], [], features
        for step in range(1, steps + 1):
            shifted = torch.cat([torch.zeros_like(previous[:, :1]), previous[:, :-1]], dim=1)
            shifted = shifted * previous_real
            inputs.append(self.mix(torch.cat([embedded, shifted], dim=-1)))
            hidden = torch.cat(inputs, dim=1)
            positions = batch.position_ids.repeat(1, step)
            mask = unrolled_mask(batch.attention_mask.bool(), step)
            additive = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~mask, torch.finfo(hidden.dtype).min)
            out = self.layer(hidden, attention_mask=additive[:, None],
                             position_ids=positions,
                             position_embeddings=self.rotary(hidden, positions))
            previous = out[:, (step - 1) * length:]
            outputs.append(previous)
        return outputs

    def kept_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden) @ self.head.T


def unrolled_mask(real: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, sL, sL] bool: query (u, j) sees key (1, i) for i <= j-u+1 (real keys), key (t, i) for
    2 <= t <= u iff i == j-u+t, and always itself."""
    batch, length = real.shape
    columns = torch.arange(length, device=real.device)
    blocks = []
    for u in range(1, steps + 1):
        row = []
        for t in range(1, steps + 1):
            if t == 1:
                block = (columns[None, :] <= columns[:, None] - u + 1)[None] & real[:, None, :]
            elif t <= u:
                block = (columns[None, :] == columns[:, None] - u + t)[None].expand(batch, -1, -1)
            else:
                block = torch.zeros(batch, length, length, dtype=torch.bool, device=real.device)
            if t == u:
                block = block | torch.eye(length, dtype=torch.bool, device=real.device)[None]
            row.append(block)
        blocks.append(torch.cat(row, dim=2))
    return torch.cat(blocks, dim=1)


@torch.inference_mode()
def target_pass(target, batch: SequenceBatch):
    """The target's fused features [B, L, H] (for the draft) and its logits at loss columns."""
    out = target.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, output_hidden_states=True)
    selected = out.last_hidden_state[batch.loss_mask.bool()]
    return out.hidden_states, target.lm_head(selected).float()


def step_loss(draft: EagleDraft, target, batch: SequenceBatch, unroll: int) -> torch.Tensor:
    hidden_states, target_logits = target_pass(target, batch)
    features = draft.fused(hidden_states)
    kept_target = torch.softmax(target_logits, dim=-1)[:, draft.token_ids]
    columns = batch.loss_mask.bool()
    total = 0.0
    for step, output in enumerate(draft.unrolled(batch, features, unroll)):
        log_q = torch.log_softmax(draft.kept_logits(output[columns]), dim=-1)
        total = total + 0.8 ** step * -(kept_target * log_q).sum(-1).mean()
    return total


def draft_full_logits(draft: EagleDraft, hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    full = torch.full((*hidden.shape[:-1], vocab), float("-inf"), device=hidden.device)
    full[..., draft.token_ids] = draft.kept_logits(hidden)
    return full


@torch.inference_mode()
def per_step_acceptance(draft: EagleDraft, target, evaluator, steps: int) -> dict:
    """alpha per chain step at T = 0 and 1, and per-column greedy matches for the tau walk.
    Step 1 is averaged over the evaluator's columns (as a token-only draft's alpha); step s >= 2
    over the columns where a chain starting inside the answer puts its s-th token."""
    results, matches = {}, []
    for temperature, batches in evaluator.batches.items():
        sampling = SamplingConfig(temperature=temperature)
        sums, counts = [0.0] * steps, [0.0] * steps
        for batch, target_logits in zip(batches, evaluator.target_logits[temperature]):
            batch = batch.to(target.device)
            hidden_states, _ = target_pass(target, batch)
            outputs = draft.unrolled(batch, draft.fused(hidden_states), steps)
            # The first loss column is the prompt's last; a chain starts one column later, and
            # answers start at the same column in every row (build_batch).
            answer_start = int(batch.loss_mask.any(0).nonzero()[0]) + 1
            for s, output in enumerate(outputs):
                mask = batch.loss_mask.clone()
                if s:  # step 1 keeps the evaluator's columns (as a token-only draft's alpha)
                    mask[:, : answer_start + s] = 0.0
                columns = mask.bool()  # only the scored columns go through the full vocabulary
                q = draft_full_logits(draft, output[columns], target_logits.shape[-1])
                per_token = analytic_acceptance(warp(target_logits[columns], sampling),
                                                warp(q, sampling))
                sums[s] += float(per_token.sum())
                counts[s] += float(columns.sum())
            if temperature == 0:
                target_ids = target_logits.argmax(-1)
                matches.append((batch, [(draft.token_ids[draft.kept_logits(o).argmax(-1)], target_ids)
                                        for o in outputs]))
        results[f"alpha_t{temperature:g}_per_step"] = [round(x / n, 4) for x, n in zip(sums, counts)]
    return results, matches


def greedy_tau(matches, gammas) -> dict:
    """Walk each row's greedy answer: a round starting after column m (x_m from the target)
    accepts the leading chain steps s = 1..gamma whose draft argmax at column m+s-1 equals the
    target's, then the target adds one token."""
    taus = {}
    for gamma in gammas:
        tokens = rounds = 0
        for batch, steps in matches:
            for row in range(batch.input_ids.shape[0]):
                columns = batch.loss_mask[row].nonzero().flatten().tolist()
                if not columns:
                    continue
                first, last = columns[0], columns[-1]  # logits columns predicting the answer
                m = first + 1  # the answer's first token comes from the target's prefill
                while m <= last:
                    accepted = 0
                    while accepted < gamma and m + accepted <= last:
                        draft_ids, target_ids = steps[min(accepted, len(steps) - 1)]
                        if draft_ids[row, m + accepted] != target_ids[row, m + accepted]:
                            break
                        accepted += 1
                    tokens += min(accepted + 1, last + 1 - m)  # no bonus past the answer
                    rounds += 1
                    m += accepted + 1
        taus[f"gamma{gamma}"] = round(tokens / rounds, 3)
    return taus


@torch.inference_mode()
def token_draft_matches(model, evaluator):
    out = []
    for batch, target_logits in zip(evaluator.batches[0.0], evaluator.target_logits[0.0]):
        logits = evaluator._logits(model, batch)
        out.append((batch, [(logits.argmax(-1), target_logits.argmax(-1))]))
    return out


@torch.inference_mode()
def step_seconds(target, drafts: dict, context: int = 150, steps: int = 100, rounds: int = 3) -> dict:
    """Median over rounds of the seconds per one-token cached step: the target, each token-only
    draft (HF model), and the EAGLE draft (fuse + mix + its layer with a cache + head)."""
    from transformers import DynamicCache

    def hf_step(model):
        cache = DynamicCache()
        ids = torch.randint(0, 1000, (1, context), device=target.device)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = ids[:, -1:]
        start = time.perf_counter()
        for i in range(steps):
            model(input_ids=token, past_key_values=cache, use_cache=True,
                  position_ids=torch.tensor([[context + i]], device=target.device))
        return (time.perf_counter() - start) / steps

    def eagle_step(draft: EagleDraft):
        hidden = target.config.hidden_size
        cache = DynamicCache()
        prefix = torch.randn(1, context, hidden, device=target.device)
        positions = torch.arange(context, device=target.device)[None]
        draft.layer(prefix, position_ids=positions, cache=cache, use_cache=True,
                    position_embeddings=draft.rotary(prefix, positions))
        features = torch.randn(1, 1, len(FEATURE_LAYERS) * hidden, device=target.device)
        previous = draft.fuse(features)
        start = time.perf_counter()
        for i in range(steps):
            x = draft.mix(torch.cat([draft.embed[torch.tensor([[i]], device=target.device)],
                                     previous], dim=-1))
            position = torch.tensor([[context + i]], device=target.device)
            previous = draft.layer(x, position_ids=position, cache=cache, use_cache=True,
                                   position_embeddings=draft.rotary(x, position))
            draft.kept_logits(previous).argmax(-1)
        return (time.perf_counter() - start) / steps

    timings = {"target": lambda: hf_step(target)}
    for name, model in drafts.items():
        timings[name] = (lambda m=model: eagle_step(m)) if isinstance(model, EagleDraft) else (
            lambda m=model: hf_step(m))
    results = {name: [] for name in timings}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, run in timings.items():
            results[name].append(run())
    medians = {name: sorted(values[1:])[len(values[1:]) // 2] for name, values in results.items()}
    return {"seconds_per_step": medians,
            "cost_ratio": {name: round(v / medians["target"], 4) for name, v in medians.items()}}


def load_batches(records: list[dict], pad_id: int, batch_size: int, seed: int):
    """Endless shuffled batches of the answers (prompts cut to their last 128 tokens, as the
    evaluator's), reshuffled with the next seed after each pass."""
    examples = [(r["prompt_ids"][-128:], r["completion_ids"]) for r in records if r["completion_ids"]]
    random.Random(seed).shuffle(examples)
    while True:
        for i in range(0, len(examples) - batch_size + 1, batch_size):
            chunk = examples[i:i + batch_size]
            yield build_batch([p for p, _ in chunk], [c for _, c in chunk], pad_id)
        seed += 1
        random.Random(seed).shuffle(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("answers")
    parser.add_argument("out")
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--unroll", type=int, default=4, help="chain steps trained (eval: 5)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--eval-every", type=float, default=4.0, help="training minutes")
    parser.add_argument("--baseline", nargs="*", default=[], help="token-only drafts to score")
    parser.add_argument("--init", default=None,
                        help="an eagle_draft.safetensors to continue training from (no warm-up)")
    parser.add_argument("--skip-batches", type=int, default=0,
                        help="with --init: the steps already trained (continue the data order)")
    parser.add_argument("--time-only", default=None,
                        help="a trained eagle_draft.safetensors: time the steps, no training")
    args = parser.parse_args()
    if args.time_only and (args.init or args.skip_batches):
        parser.error("--time-only times a trained draft and trains nothing: drop --init/--skip-batches.")
    if args.skip_batches and not args.init:
        parser.error("--skip-batches continues a run: give the draft it trained with --init.")
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, tokenizer = load_model(DEFAULT_TARGET)
    target.requires_grad_(False)
    eos = eos_token_ids(target, tokenizer)
    records = [record for _, record in read_jsonl(args.answers)]
    # The demo's rule for its pruned head (demo_data.answer_vocabulary): the most frequent ids.
    token_ids = frequent_tokens([r["completion_ids"] for r in records], args.vocab,
                                target.config.vocab_size, always=eos)
    if args.time_only:
        draft = EagleDraft(target, token_ids).to(target.device)
        draft.load_state_dict(load_file(args.time_only), strict=False)
        baselines = {name: load_model(name, device=target.device, dtype=target.dtype)[0]
                     for name in args.baseline}
        timing = step_seconds(target, {**baselines, "eagle": draft.eval()})
        print(json.dumps(timing), flush=True)
        atomic_write_json(out / "timing.json", {"target": DEFAULT_TARGET, "dtype": str(target.dtype),
                                                "args": vars(args), **timing})
        return
    evaluators = {}
    for split, spec in SPLITS.items():
        config = DistillConfig(eval_data=spec, max_prompt_tokens=128, eval_max_new_tokens=64,
                               eval_tau_prompts=0, seed=0)
        examples = held_out_examples(config, tokenizer)
        config = replace(config, eval_prompts=len(examples))  # every prompt of the split
        evaluators[split] = make_evaluator(config, target, tokenizer, examples)
    report = {"target": DEFAULT_TARGET, "dtype": str(target.dtype), "args": vars(args),
              "feature_layers": FEATURE_LAYERS, "baselines": {}, "evals": []}
    for name in args.baseline:
        model = load_model(name, device=target.device, dtype=target.dtype)[0]
        report["baselines"][name] = {
            split: {**ev.alpha(model), **greedy_tau(token_draft_matches(model, ev), range(1, 6))}
            for split, ev in evaluators.items()}
        print(name, json.dumps(report["baselines"][name]), flush=True)
        atomic_write_json(out / "probe.json", report)
    draft = EagleDraft(target, token_ids).to(target.device)
    if args.init:
        draft.load_state_dict(load_file(args.init), strict=False)
    trainable = [p for p in draft.parameters() if p.requires_grad]
    report["trainable_parameters"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    batches = load_batches(records, 0, args.batch_size, 0)
    for _ in range(args.skip_batches):  # a continued run picks up the data order where it was
        next(batches)

    def evaluate(step: int, minutes: float) -> None:
        draft.eval()
        row = {"step": step, "train_minutes": round(minutes, 2)}
        for split, ev in evaluators.items():
            alphas, matches = per_step_acceptance(draft, target, ev, MAX_STEPS_EVAL)
            row[split] = {**alphas, **greedy_tau(matches, range(1, 6))}
        report["evals"].append(row)
        atomic_write_json(out / "probe.json", report)
        print(json.dumps(row), flush=True)
        draft.train()

    evaluate(0, 0.0)
    trained, step, next_eval, losses = 0.0, 0, args.eval_every * 60, []
    budget = args.minutes * 60
    while trained < budget:
        start = time.perf_counter()
        lr = args.lr * (1.0 if args.init else min(1.0, (step + 1) / 50))
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The draft's matmuls in the target's dtype (bf16 on AMX: ~4x fp32), master weights fp32.
        with torch.autocast(target.device.type, dtype=target.dtype,
                            enabled=target.dtype != torch.float32):
            loss = step_loss(draft, target, next(batches).to(target.device), args.unroll)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        trained += time.perf_counter() - start
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            report.setdefault("loss", []).append({"step": step, "minutes": round(trained / 60, 2),
                                                  "loss": round(sum(losses) / len(losses), 4)})
            print(report["loss"][-1], flush=True)
            losses = []
        if trained >= next_eval or trained >= budget:
            evaluate(step, trained / 60)
            next_eval += args.eval_every * 60
    save_file({k: v.contiguous() for k, v in draft.state_dict().items()}, out / "eagle_draft.safetensors")
    report["steps"] = step
    atomic_write_json(out / "probe.json", report)


if __name__ == "__main__":
    main()

"""Randomised engine runs: every combination the other tests pick by hand, drawn at random.

Each seed draws a pair (llama or qwen2; a draft equal to the target, random, perturbed, or
perturbed with a pruned head), a speculation (gamma, adaptive threshold, chain, static or dynamic
tree, lenience) and up to 8 requests (greedy or sampled with their own temperature / top-k /
top-p, budgets, stop ids, seeds) that join at random steps; some are cancelled, each step takes
a random draft-length limit (as the server's policy sets it) and now and then the draft is
swapped. In float32 every greedy row must equal the target's own greedy decoding of its prompt
(transformers' generate, alone), every row must finish within its budget and stop at its first
stop id, and a sampled row may end early only at a stop id.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import VOCAB, perturbed_copy, tiny_model

from distillspec import Decoder, Request
from distillspec.decoding.params import SamplingConfig, SpeculationConfig
from distillspec.models.pruned_head import prune_head

SEEDS = 60
TREES = ["", "", "3", "4:1", "3:2", "0,1,0.0", "6:3", "15:2", "dyn:6:3:2", "dyn:2:2:1",
         "dyn:8:4:3"]
DRAFTS = ["same", "random", "partial", "partial", "pruned"]


@pytest.fixture(scope="module")
def pairs():
    pairs = {}
    for arch in ("llama", "qwen2"):
        target = tiny_model(arch, seed=0)
        pruned = prune_head(perturbed_copy(target, 0.05), torch.arange(0, VOCAB, 2))
        pairs[arch] = {"target": target, "same": copy.deepcopy(target),
                       "random": tiny_model(arch, seed=7), "partial": perturbed_copy(target, 0.1),
                       "pruned": pruned}
    return pairs


def target_greedy(target, request: Request) -> list[int]:
    """The target's own greedy answer to one prompt, cut after its first stop id."""
    ids = torch.tensor([request.prompt_ids])
    stops = sorted(request.stop_token_ids) or None
    out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=request.max_new_tokens, pad_token_id=0,
                          eos_token_id=stops)[0, ids.shape[1]:].tolist()
    ends = [i for i, token in enumerate(out) if token in request.stop_token_ids]
    return out[: ends[0] + 1] if ends else out


def random_sampling(rng: random.Random) -> SamplingConfig:
    if rng.random() < 0.5:
        return SamplingConfig()
    return SamplingConfig(temperature=rng.choice([0.5, 1.0, 1.5]), top_k=rng.choice([0, 0, 5]),
                          top_p=rng.choice([1.0, 0.9]))


def random_plan(rng: random.Random) -> list[tuple[int, Request]]:
    """(joining step, request) for up to 8 requests."""
    plan = []
    for index in range(rng.randint(1, 8)):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 14))]
        stops = frozenset(rng.sample(range(3, VOCAB), rng.choice([0, 0, 1, 3])))
        seed = rng.choice([None, rng.randrange(100)])
        request = Request(prompt, rng.randint(1, 40), random_sampling(rng), stops, seed, index)
        plan.append((rng.randint(0, 6), request))
    return plan


def run(decoder: Decoder, plan, pairs_of_arch, rng: random.Random):
    """Step the decoder through the plan; (outputs, finish reasons) per request id."""
    outputs = {request.request_id: [] for _, request in plan}
    reasons = {}
    cancel_at = {r.request_id: rng.randint(1, 10) for _, r in plan if rng.random() < 0.1}
    last_join = max(join for join, _ in plan)
    for step in range(400):
        if step > last_join and not decoder.has_work:
            break
        for join, request in plan:
            if join == step:
                decoder.add(request)
        for request_id, at in cancel_at.items():
            if at == step:
                decoder.cancel(request_id)
        decoder.lookahead_limit = rng.choice([None, None, None, 0, 1, 2])
        # Rows joining on every other plain step skip the draft's prefill (a server where plain
        # has settled); no draw from rng, so the plans stay those of before.
        decoder.defer_draft_prefill = decoder.lookahead_limit == 0 and step % 2 == 0
        if rng.random() < 0.03:
            decoder.replace_draft(pairs_of_arch[rng.choice(["same", "partial", "pruned"])])
        for update in decoder.step():
            outputs[update.request_id] += update.new_tokens
            if update.finished:
                reasons[update.request_id] = update.finish_reason
        decoder.finished.clear()
    return outputs, reasons


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_engine_runs_keep_greedy_rows_exact(pairs, seed):
    rng = random.Random(seed)
    models = pairs[rng.choice(["llama", "qwen2"])]
    speculation = SpeculationConfig(
        gamma=rng.randint(1, 12), confidence_threshold=rng.choice([0.0, 0.0, 0.3, 0.7]),
        tree=rng.choice(TREES), lenience=rng.choice(["none", "none", "lin", "exp"]),
        epsilon=rng.choice([1.0, 0.5, 0.2]))
    decoder = Decoder(models["target"], models[rng.choice(DRAFTS)], speculation,
                      generator=torch.Generator().manual_seed(seed))
    plan = random_plan(rng)
    outputs, reasons = run(decoder, plan, models, rng)
    assert set(reasons) == set(outputs), "every request finishes"
    for _, request in plan:
        out, reason = outputs[request.request_id], reasons[request.request_id]
        assert len(out) <= request.max_new_tokens
        assert all(0 <= token < VOCAB for token in out)
        assert not any(token in request.stop_token_ids for token in out[:-1]), "past a stop id"
        if reason == "cancelled":
            continue
        if request.sampling.greedy:
            assert out == target_greedy(models["target"], request), f"row {request.request_id}"
        else:
            stopped = bool(out) and out[-1] in request.stop_token_ids
            assert len(out) == request.max_new_tokens or stopped, f"row {request.request_id}"

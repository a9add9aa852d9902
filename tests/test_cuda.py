"""The lossless guarantees on a CUDA device (skipped without one; ``benchmarks/gpu_check.sh``
runs them on a GPU machine): greedy chain and tree SD equal the target's own greedy decoding
token for token in float32, and sampled SD's tokens follow the target's distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, perturbed_copy, tiny_model

from distillspec import autoregressive_generate, speculative_generate
from distillspec.decoding.acceptance import verify
from distillspec.decoding.sampling import sample

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def pair():
    torch.backends.cuda.matmul.allow_tf32 = False  # exactness is claimed in float32, not tf32
    torch.backends.cudnn.allow_tf32 = False
    target = tiny_model("llama", seed=0).to(CUDA)
    return target, perturbed_copy(target, 0.2).to(CUDA)


def test_greedy_chain_and_trees_equal_the_target_on_cuda(pair):
    target, draft = pair
    input_ids, attention_mask = (t.to(CUDA) for t in left_padded([5, 11, 2, 8]))
    plain = autoregressive_generate(target, input_ids, attention_mask, max_new_tokens=24)
    for gamma in (1, 2, 4, 8):
        chain = speculative_generate(target, draft, input_ids, attention_mask, gamma=gamma,
                                     max_new_tokens=24)
        assert chain.sequences == plain.sequences, f"gamma={gamma}"
    for spec in ("4", "8:2", "15:2"):
        tree = speculative_generate(target, draft, input_ids, attention_mask, gamma=4, tree=spec,
                                    max_new_tokens=24)
        assert tree.sequences == plain.sequences, f"tree={spec}"


def test_the_acceptance_rule_follows_the_target_on_cuda():
    generator = torch.Generator(device=CUDA).manual_seed(0)
    target_probs = torch.softmax(torch.randn(4, 6, device=CUDA, generator=generator) * 1.5, -1)
    draft_probs = torch.softmax(torch.randn(3, 6, device=CUDA, generator=generator) * 1.5, -1)
    trials = 400_000
    draft_block = draft_probs.expand(trials, *draft_probs.shape)
    draft_tokens = sample(draft_block, generator)
    outcome = verify(draft_tokens, draft_block, target_probs.expand(trials, *target_probs.shape),
                     generator=generator)
    first = torch.where(outcome.num_accepted > 0, draft_tokens[:, 0], outcome.next_tokens)
    empirical = torch.bincount(first, minlength=6).float() / trials
    # 4e5 draws over 6 cells: sampling noise ~0.002 in total variation.
    assert 0.5 * (empirical - target_probs[0]).abs().sum().item() < 0.008


def test_sampled_sd_emits_the_target_distribution_on_cuda(pair):
    target, draft = pair
    rows = 16_384
    prompt, _ = left_padded([6])
    input_ids = prompt.to(CUDA).expand(rows, -1).contiguous()
    with torch.no_grad():
        exact = torch.softmax(target(prompt.to(CUDA)).logits[0, -1].float(), -1)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    result = speculative_generate(target, draft, input_ids, gamma=3, max_new_tokens=1,
                                  temperature=1.0, generator=generator)
    first = torch.tensor([row[0] for row in result.sequences], device=CUDA)
    empirical = torch.bincount(first, minlength=exact.numel()).float() / rows
    # The reference: as many draws from the exact distribution, the same statistic.
    control = torch.multinomial(exact, rows, replacement=True, generator=generator)
    control_tv = 0.5 * (torch.bincount(control, minlength=exact.numel()).float() / rows
                        - exact).abs().sum().item()
    sd_tv = 0.5 * (empirical - exact).abs().sum().item()
    assert sd_tv < max(3 * control_tv, 0.02), (sd_tv, control_tv)

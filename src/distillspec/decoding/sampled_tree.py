"""A sampled tree block's rule from the target's logits: warp p, ``acceptance.verify_tree``,
``acceptance.tree_acceptance``; shared by the static and the dynamic tree strategies.

On CPU at batch 1 this is some tens of small tensor calls over the vocabulary (the rule's
per-sibling passes, the softmax of the p it reads): dispatch-bound, ~1.3 ms of a ~38 ms tree
4:1 step on the demo's pair, 1.8 ms of a ~46 ms tree 15:2 step. Eager, it warps only the
columns of p it reads (``WarpedOnDemand``) and stops trying siblings once no row tries one
(``acceptance.verify_tree``): 15:2 took 3.1 ms before either. Where the target's own steps run
compiled, it runs ``torch.compile``d
too (~0.35 ms on the same inputs, hot; ~0.65 ms inside a real step, its inputs no longer in the
cache). It traces into one graph because the tree's tables are plain attributes (``Tree``): read
through a cached_property, whose lock Dynamo cannot enter, they broke it into five, 0.9 ms in
the step (tests/test_acceptance.py checks the graph count). The math is the same, so the
emitted tokens follow p exactly either way (the rule's distribution tests run both); the
rounding is the compiled kernels', as the compiled target's logits already are.

Graphs: one per tree and sampled-row count 1 / more than 1 (dynamo specialises a batch of 1 and
makes the batch dynamic at the second size), for each of the two compiled functions: the
temperature-only warp fused with the rule (temperatures are a tensor, so a new temperature is no
new graph), and the rule alone after an eager warp when a row uses top-k or top-p (their values
would be guarded constants in a graph).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from distillspec.decoding.acceptance import tree_acceptance, verify_tree
from distillspec.decoding.kv_cache import compile_failure
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import pad_vocab, tempered_probs, warp_rows

if TYPE_CHECKING:
    from distillspec.decoding.tree import Tree


class RuleInputs(NamedTuple):
    """What ``verify_tree`` takes besides the tree, the tokens and the distributions."""

    max_accepted: torch.Tensor  # [S] each row's cap
    lenience: str | None
    epsilon: float
    accept_uniforms: torch.Tensor  # [S, N]
    final_uniforms: torch.Tensor  # [S]


def sampled_tree_outcome(
    tree: Tree,
    node_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_logits: torch.Tensor,
    samplings: Sequence[SamplingConfig],
    *,
    vocab: int, max_accepted: torch.Tensor, lenience: str | None, epsilon: float,
    uniforms: tuple[torch.Tensor, torch.Tensor], compiled: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``(path, num_accepted, next_tokens, alpha_sum float64, levels int64)`` of the sampled
    rows: p = ``warp(target_logits)`` per row's config (padded to ``vocab``), q the
    ``draft_probs`` the nodes were drawn from; shapes and ``uniforms`` as ``verify_tree``.
    ``compiled``: through the compiled functions (see the module's docstring)."""
    inputs = RuleInputs(max_accepted, lenience, epsilon, *uniforms)
    if not compiled:
        return _rule(tree, node_tokens, draft_probs,
                     WarpedOnDemand(target_logits, samplings, vocab), inputs)
    if all(s.top_k == 0 and s.top_p >= 1.0 for s in samplings):
        temperatures = torch.tensor([s.temperature for s in samplings],
                                    device=target_logits.device)
        function, distributions = _tempered_rule, (target_logits, temperatures, vocab)
    else:
        function = _rule
        distributions = (warp_rows(pad_vocab(target_logits, vocab), samplings),)
    try:
        return _compiled(function)(tree, node_tokens, draft_probs, *distributions, inputs)
    except torch._dynamo.exc.TorchDynamoException as error:
        raise compile_failure("the sampled tree rule", error) from error


class WarpedOnDemand:
    """The target's p = ``warp_rows(pad_vocab(logits, vocab), samplings)``, indexed like that
    ``[B, N + 1, V]`` tensor but warped only where it is read. The rule reads p after the root
    and after the nodes it accepts (at most depth + 1 of the N + 1 columns per row), so warping
    every column would cost a softmax over the vocabulary for each node: 16 columns for tree
    15:2, 0.8 ms of a 45 ms step at batch 1 on a 2-core CPU. Each read warps afresh (the rule
    reads a row's column at most twice). Index forms: those ``verify_tree`` and
    ``tree_acceptance`` use, whose result has the batch rows, in order, as its first dimension."""

    def __init__(self, logits: torch.Tensor, samplings: Sequence[SamplingConfig], vocab: int):
        self.logits, self.samplings, self.vocab = logits, samplings, vocab

    def __getitem__(self, index) -> torch.Tensor:
        picked = self.logits[index]
        if picked.shape[0] != len(self.samplings):
            raise ValueError(f"WarpedOnDemand reads whole rows in order: index {index!r} "
                             f"gives {picked.shape[0]} rows, not {len(self.samplings)}.")
        return warp_rows(pad_vocab(picked, self.vocab), self.samplings)


def _rule(tree, node_tokens, draft_probs, target_probs, inputs: RuleInputs):
    """``verify_tree`` on p = ``target_probs``, then the block's analytic alpha
    (``tree_acceptance``)."""
    path, count, next_tokens = verify_tree(
        tree, node_tokens, draft_probs, target_probs, max_accepted=inputs.max_accepted,
        lenience=inputs.lenience, epsilon=inputs.epsilon,
        uniforms=(inputs.accept_uniforms, inputs.final_uniforms))
    alpha_sum, levels = tree_acceptance(tree, path, count, inputs.max_accepted, draft_probs,
                                        target_probs)
    return path, count, next_tokens, alpha_sum, levels


def _tempered_rule(tree, node_tokens, draft_probs, target_logits, temperatures, vocab,
                   inputs: RuleInputs):
    """``_rule`` on p = ``tempered_probs`` (``warp`` without top-k or top-p)."""
    target_probs = tempered_probs(pad_vocab(target_logits, vocab), temperatures)
    return _rule(tree, node_tokens, draft_probs, target_probs, inputs)


_compiled = functools.cache(torch.compile)  # one compiled wrapper per function

"""A sampled tree block's rule from the target's logits: warp p, ``acceptance.verify_tree``,
``acceptance.tree_acceptance``; shared by the static and the dynamic tree strategies.

On CPU at batch 1 this is about a hundred small tensor calls over the vocabulary (the rule's
per-sibling passes, the softmax of every node's p): dispatch-bound, ~1.4 ms of a ~36 ms tree
step on the demo's pair. Where the target's own steps run compiled, the whole of it runs as one
``torch.compile``d function too (~0.35 ms); the math is the same, so the emitted tokens follow
p exactly either way (the rule's distribution tests run both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from distillspec.decoding.acceptance import tree_acceptance, verify_tree
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import pad_vocab, warp, warp_rows

if TYPE_CHECKING:
    from distillspec.decoding.tree import Tree

_compiled_rule = None


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
    """``(path, num_accepted, next_tokens, alpha_sum, levels)`` of the sampled rows: p is
    ``warp(target_logits)`` per row's config (padded to ``vocab``), q the ``draft_probs`` the
    nodes were drawn from; shapes and ``uniforms`` as ``verify_tree``. ``compiled``: run it as
    one compiled function when every row shares one config (else eager: one graph per config
    mix would be compiled for nothing)."""
    rule = (max_accepted, lenience, epsilon, uniforms[0], uniforms[1])
    if compiled and len(set(samplings)) == 1:
        try:
            return _compiled()(tree, node_tokens, draft_probs, target_logits, samplings[0],
                               vocab, *rule)
        except torch._dynamo.exc.TorchDynamoException as error:
            raise RuntimeError(
                f"Compiling the sampled tree rule failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}); run with --compile off."
            ) from error
    target_probs = warp_rows(pad_vocab(target_logits, vocab), samplings)
    return _rule(tree, node_tokens, draft_probs, target_probs, *rule)


def _rule(tree, node_tokens, draft_probs, target_probs, max_accepted, lenience, epsilon,
          accept_uniforms, final_uniforms):
    path, count, next_tokens = verify_tree(
        tree, node_tokens, draft_probs, target_probs, max_accepted=max_accepted,
        lenience=lenience, epsilon=epsilon, uniforms=(accept_uniforms, final_uniforms))
    alpha_sum, levels = tree_acceptance(tree, path, count, max_accepted, draft_probs,
                                        target_probs)
    return path, count, next_tokens, alpha_sum, levels


def _warped_rule(tree, node_tokens, draft_probs, target_logits, sampling, vocab, *rule):
    target_probs = warp(pad_vocab(target_logits, vocab), sampling)
    return _rule(tree, node_tokens, draft_probs, target_probs, *rule)


def _compiled():
    """One compiled function for every tree, config and batch size (dynamo guards on the tree
    and the config; after a second batch size it compiles one graph with the batch dynamic)."""
    global _compiled_rule
    if _compiled_rule is None:
        _compiled_rule = torch.compile(_warped_rule)
    return _compiled_rule

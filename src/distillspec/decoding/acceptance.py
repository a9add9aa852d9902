"""The speculative-decoding acceptance rule, as pure batched tensor functions.

Notation (Leviathan et al. 2023; DistillSpec): p = target, q = draft. Code names them
``target_probs`` and ``draft_probs``. For each drafted token x_i, sampled from q_i:

    accept with probability  min(1, f(p_i(x_i), eps) / q_i(x_i))

with f(p, 1) = p (lossless). On the first rejection the replacement is drawn from the residual
``norm(max(0, p_i - q_i))``; if all gamma tokens are accepted a bonus token is drawn from
p_{gamma+1}. With f = identity the emitted tokens are distributed exactly as the target's.

Lenient (lossy) variants, eps in (0, 1]:  f_lin = p / eps,  f_sq = p / eps^2,  f_exp = p^eps.
The residual for lenient rules is not fixed by the paper; we use the lossless residual
norm(max(0, p - q)), which is the target's distribution restricted to where the draft
under-proposes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from distillspec.decoding.sampling import sample

if TYPE_CHECKING:
    from distillspec.decoding.tree import Tree


def f_lin(target_token_probs: torch.Tensor, epsilon: float) -> torch.Tensor:
    """f_lin(p, eps) = p / eps."""
    return target_token_probs / epsilon


def f_sq(target_token_probs: torch.Tensor, epsilon: float) -> torch.Tensor:
    """f_sq(p, eps) = p / eps^2."""
    return target_token_probs / (epsilon * epsilon)


def f_exp(target_token_probs: torch.Tensor, epsilon: float) -> torch.Tensor:
    """f_exp(p, eps) = p^eps (0^eps = 0 for eps > 0)."""
    return target_token_probs.pow(epsilon)


LENIENCE_FUNCTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "lin": f_lin,
    "sq": f_sq,
    "exp": f_exp,
}


def acceptance_probability(
    target_token_probs: torch.Tensor,
    draft_token_probs: torch.Tensor,
    lenience: str | None = None,
    epsilon: float = 1.0,
) -> torch.Tensor:
    """min(1, f(p(x), eps) / q(x)) elementwise; ``q(x) > 0`` because x was sampled from q."""
    boosted = target_token_probs
    if lenience not in (None, "none") and epsilon != 1.0:
        boosted = LENIENCE_FUNCTIONS[lenience](target_token_probs, epsilon)
    return torch.clamp(boosted / draft_token_probs.clamp_min(1e-30), max=1.0)


def residual_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim.

    Where the residual has no mass (p == q, so rejection had probability 0 and only rounding got
    us here) fall back to p itself.
    """
    residual = (target_probs - draft_probs).clamp_min(0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_probs)


@dataclass
class Verification:
    """The outcome of verifying one block of drafted tokens, per row."""

    num_accepted: torch.Tensor  # [B] int64, leading drafted tokens accepted (0..draft length)
    next_tokens: torch.Tensor  # [B] int64, the correction (after a rejection) or the bonus token
    accepted_mask: torch.Tensor  # [B, gamma] bool, True for the accepted prefix


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    draft_lengths: torch.Tensor | None = None,
    lenience: str | None = None,
    epsilon: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Verification:
    """Apply the acceptance rule to a batch of drafted blocks.

    Args:
        draft_tokens: ``[B, gamma]`` the tokens the draft sampled.
        draft_probs: ``[B, gamma, V]`` q_1..q_gamma, the distributions they were sampled from.
        target_probs: ``[B, gamma + 1, V]`` p_1..p_{gamma+1} from one target forward pass.
        draft_lengths: ``[B]`` how many of the gamma tokens each row really proposes (adaptive
            drafting, budgets); tokens past a row's length are never accepted, and a row that
            accepts all of its ``n`` tokens gets its bonus from p_{n+1}. Default: all gamma.
        uniforms: ``(accept [B, gamma], final [B])`` in [0, 1) to use instead of ``generator``
            (the engine draws them from per-row generators).
    """
    batch, gamma = draft_tokens.shape
    index = draft_tokens.unsqueeze(-1)
    target_token_probs = target_probs[:, :gamma].gather(-1, index).squeeze(-1)
    draft_token_probs = draft_probs.gather(-1, index).squeeze(-1)
    accept_prob = acceptance_probability(target_token_probs, draft_token_probs, lenience, epsilon)
    if uniforms is None:
        accept_uniforms = torch.rand(
            accept_prob.shape, generator=generator, device=accept_prob.device, dtype=torch.float32
        )
        final_uniforms = None
    else:
        accept_uniforms, final_uniforms = uniforms
    accepted = accept_uniforms < accept_prob
    if draft_lengths is not None:
        positions = torch.arange(gamma, device=accepted.device)
        accepted &= positions.unsqueeze(0) < draft_lengths.unsqueeze(1)
    # accepted_mask is the accepted *prefix*: everything after the first rejection is discarded.
    accepted_mask = torch.cumprod(accepted.to(torch.int64), dim=1).bool()
    num_accepted = accepted_mask.sum(dim=1)
    lengths = draft_lengths if draft_lengths is not None else torch.full_like(num_accepted, gamma)
    next_tokens = _next_tokens(
        num_accepted, lengths, draft_probs, target_probs, generator, final_uniforms
    )
    return Verification(num_accepted, next_tokens, accepted_mask)


def verify_greedy(
    draft_tokens: torch.Tensor,
    target_tokens: torch.Tensor,
    draft_lengths: torch.Tensor | None = None,
) -> Verification:
    """``verify`` at temperature 0 without distributions: p and q are one-hot, so a drafted
    token is accepted iff it is the target's argmax, and the token after the accepted prefix is
    the target's argmax there. ``target_tokens [B, gamma + 1]`` = argmax of p_1..p_{gamma+1}.

    Identical to ``verify`` on one-hot ``draft_probs`` / ``target_probs`` (tested), without
    materialising ``[B, gamma + 1, V]`` tensors.
    """
    batch, gamma = draft_tokens.shape
    accepted = draft_tokens == target_tokens[:, :gamma]
    if draft_lengths is not None:
        positions = torch.arange(gamma, device=accepted.device)
        accepted &= positions.unsqueeze(0) < draft_lengths.unsqueeze(1)
    accepted_mask = torch.cumprod(accepted.to(torch.int64), dim=1).bool()
    num_accepted = accepted_mask.sum(dim=1)
    rows = torch.arange(batch, device=draft_tokens.device)
    return Verification(num_accepted, target_tokens[rows, num_accepted], accepted_mask)


def _next_tokens(
    num_accepted: torch.Tensor,
    draft_lengths: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None,
) -> torch.Tensor:
    """Sample the token after the accepted prefix: residual at the rejection, else the bonus."""
    batch, gamma = draft_probs.shape[0], draft_probs.shape[1]
    if gamma == 0:  # nothing was drafted: a plain target step
        return sample(target_probs[:, 0], generator, uniforms)
    rows = torch.arange(batch, device=num_accepted.device)
    target_at_stop = target_probs[rows, num_accepted]  # [B, V]
    # Rows that accepted everything they drafted have no q at the stop: residual against 0 is p.
    draft_at_stop = draft_probs[rows, num_accepted.clamp(max=gamma - 1)]
    rejected = (num_accepted < draft_lengths).unsqueeze(-1)
    draft_at_stop = torch.where(rejected, draft_at_stop, 0.0)
    return sample(residual_distribution(target_at_stop, draft_at_stop), generator, uniforms)


def analytic_acceptance(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """Per-position sum_v min(p, q) = 1 - TVD(p, q); ``[..., V] -> [...]``."""
    return torch.minimum(target_probs, draft_probs).sum(dim=-1)


# -- several candidates per position: a sampled token tree -------------------------------------
# Why the tree rule is exact: at a node u, candidate j is a draw from q_j (q_u without the
# earlier siblings, renormalised) and emits min(r_j, q_j); otherwise it hands over to
# r_{j+1} = norm(max(0, r_j - q_j)). Whatever x_j was, the rest of the procedure is the same rule
# for r_{j+1} with some proposal drawn from the q it is tested against, so by induction from the
# last candidate (whose fallback is the final draw from r) the token emitted at u follows
# r_1 = p_u exactly; the rule is exact for any proposal that may depend on the earlier draws.
# Drawing without replacement (Yang et al. 2024, arXiv:2401.06706; SpecTr's k-sequential
# selection) wastes no candidate on a repeat, which i.i.d. draws (SpecInfer) do whenever q is
# peaked. A rejected x_j had r_j(x_j) < q_j(x_j), so r_{j+1}(x_j) = 0: the siblings after it
# lose nothing by never proposing it. The accepted child's own children were drawn from q after
# it, whatever happened at u, so the next level is the same rule again.


def _tree_tables(tree: Tree, batch: int, device) -> tuple[torch.Tensor, ...]:
    """``(children [N + 1, k], draft columns [N + 1], row index [B])`` for ``verify_tree``: each
    input column's children (-1: none) and the column of q its children were drawn from."""
    children = torch.tensor(tree.child_table, device=device)
    columns = torch.tensor(tree.draft_columns, device=device).clamp_min(0)  # leaves: unused
    return children, columns, torch.arange(batch, device=device)


def verify_tree(
    tree: Tree,
    node_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    max_accepted: torch.Tensor | None = None, lenience: str | None = None,
    epsilon: float = 1.0, generator: torch.Generator | None = None,
    uniforms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampled rule on a token tree: SpecInfer's multi-step speculative sampling (Miao et
    al. 2024, arXiv:2305.09781, §4) with siblings drawn without replacement (the multi-candidate
    rule of Yang et al. 2024, arXiv:2401.06706).

    At the current node u (first the root), children c_1..c_k in rank order, x_j = token(c_j)
    drawn from q_j = q_u without x_1..x_{j-1}, renormalised (``sampling.sample_without_
    replacement``), r = p_u:
        for j = 1..k: accept c_j with probability min(1, r(x_j) / q_j(x_j));
                      on rejection r <- norm(max(0, r - q_j)).
    A child whose q_j has no mass left (the earlier siblings used up q_u's support) is skipped.
    An accepted child becomes u (one level deeper); when every child is rejected (or u is a
    leaf, or the row accepted ``max_accepted[b]`` nodes) one last token is drawn from r. The
    emitted tokens follow p exactly (see above). ``lenience`` applies f to r(x_j) as in
    ``acceptance_probability`` (epsilon = 1: lossless).

    ``node_tokens [B, N]``; ``draft_probs [B, 1 + len(tree.internal), V]`` the warped q the
    children were drawn from, after the root then each of ``tree.internal``;
    ``target_probs [B, N + 1, V]`` the warped p after the root (column 0) and node n (n + 1),
    or what is indexed like it (``sampled_tree.WarpedOnDemand``: read per depth, then once);
    ``uniforms = (accept [B, N] (column n tests node n), final [B])``. Returns
    ``(path [B, depth], num_accepted [B], next_tokens [B])`` as ``accept_tree_greedy``.
    """
    batch, device = node_tokens.shape[0], node_tokens.device
    children, columns, rows = _tree_tables(tree, batch, device)
    uniforms, max_accepted, current, num_accepted, path = _tree_start(
        tree, node_tokens, max_accepted, uniforms, generator)
    going = max_accepted > 0
    # ``final``: r of the rows that rejected all children (``failed``); the others draw from
    # p after their last node, read once at the end
    final, failed = None, torch.zeros_like(going)
    for depth in range(tree.depth):
        if depth and _can_stop_early(device) and not bool(going.any()):
            break  # no row goes deeper: the later levels change nothing
        residual = target_probs[rows, current]
        siblings = children[current][:, : tree.level_widths[depth]]
        chosen, residual = _try_children(siblings, node_tokens, residual,
                                         draft_probs[rows, columns[current]], uniforms[0],
                                         going, lenience, epsilon)
        found = chosen >= 0
        stopped = going & ~found
        final = residual if final is None else torch.where(stopped.unsqueeze(1), residual, final)
        failed |= stopped
        path[:, depth] = chosen
        current = torch.where(found, chosen + 1, current)
        num_accepted += found.long()
        going = found & (num_accepted < max_accepted)
    # the others stopped after an acceptance (cap, depth) or never started: the bonus from p
    final = torch.where(failed.unsqueeze(1), final, target_probs[rows, current])
    return path, num_accepted, sample(final, generator, uniforms[1])


def _tree_start(tree: Tree, node_tokens, max_accepted, uniforms, generator):
    """``verify_tree``'s starting state: ``(uniforms, max_accepted, current, num_accepted,
    path)``, the uniforms drawn and the cap set to the depth where not given; every row at the
    root (input column 0), nothing accepted, the path empty (-1)."""
    batch, device = node_tokens.shape[0], node_tokens.device
    if uniforms is None:
        uniforms = (torch.rand(batch, tree.size, generator=generator, device=device),
                    torch.rand(batch, generator=generator, device=device))
    current = torch.zeros(batch, dtype=torch.long, device=device)
    if max_accepted is None:
        max_accepted = torch.full_like(current, tree.depth)
    path = torch.full((batch, tree.depth), -1, dtype=torch.long, device=device)
    return uniforms, max_accepted, current, torch.zeros_like(current), path


def _can_stop_early(device: torch.device) -> bool:
    """Whether ``verify_tree`` may end a loop once no row needs its later rounds (the same
    results, fewer passes over the vocabulary): where asking costs nothing, on the CPU outside
    a compiled graph (on a GPU the question would synchronise; a graph would break on it)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _try_children(children, node_tokens, residual, draft, uniforms, going, lenience, epsilon):
    """One level of ``verify_tree``: the first accepted child per row (-1: none) and the
    residual after the rejected ones, up to a positive factor per row (``sample`` normalises).
    ``children [B, K]`` node ids in rank order (-1: none); ``residual`` and ``draft [B, V]`` are
    r and q_u, both this call's own (``draft`` is modified in place); ``uniforms [B, N]`` per
    node.

    r stays unnormalised as ``(R, Z)``, r = R / Z, and q_j as ``(Q, M)``, Q = q_u without the
    siblings drawn so far, M = sum Q: a sibling costs a few passes over V (no division of whole
    rows, no copy per sibling), the same rule in other rounding."""
    rows = torch.arange(children.shape[0], device=children.device)
    chosen = torch.full_like(children[:, 0], -1)
    residual_mass = torch.ones(children.shape[0], 1, dtype=residual.dtype, device=residual.device)
    remaining = draft
    # once no row tries a sibling any more, the later ranks change nothing (scale 0, no
    # acceptance)
    stop_early = _can_stop_early(children.device)
    for rank in range(children.shape[1]):
        child = children[:, rank]
        if stop_early and not bool((going & (chosen < 0) & (child >= 0)).any()):
            break
        mass = remaining.sum(dim=-1, keepdim=True)
        live = going & (chosen < 0) & (child >= 0) & (mass.squeeze(1) > 0)
        node = child.clamp_min(0)
        token = node_tokens[rows, node]
        proposal = remaining[rows, token] / mass.squeeze(1).clamp_min(1e-30)  # q_j(x_j)
        accept = acceptance_probability(residual[rows, token] / residual_mass.squeeze(1),
                                        proposal, lenience, epsilon)
        accepted = live & (uniforms[rows, node] < accept)
        chosen = torch.where(accepted, child, chosen)
        residual, residual_mass = _rejected_residual(residual, residual_mass, remaining, mass,
                                                     live & ~accepted)
        remaining.scatter_(1, token.unsqueeze(1), 0.0)  # the next sibling avoids it
    return chosen, residual


def _rejected_residual(residual, residual_mass, remaining, mass, rejected):
    """r <- norm(max(0, r - q_j)) on the rejected rows, unnormalised: R' = max(0, R - (Z/M) Q),
    Z' = sum R' (``_try_children``'s names); other rows keep R (their scale is 0). Where R' has
    no mass (r = q_j up to rounding: the rejection had probability 0) the row keeps r, as
    ``residual_distribution`` does."""
    scale = torch.where(rejected, residual_mass.squeeze(1) / mass.squeeze(1).clamp_min(1e-30),
                        0.0).unsqueeze(1)
    updated = torch.addcmul(residual, remaining, scale, value=-1.0).clamp_min_(0.0)
    updated_mass = updated.sum(dim=-1, keepdim=True)
    empty = updated_mass <= 0
    updated.addcmul_(residual, empty.to(residual.dtype))
    return updated, torch.where(empty, residual_mass, updated_mass)


def tree_acceptance(
    tree: Tree,
    path: torch.Tensor,
    num_accepted: torch.Tensor,
    max_accepted: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic alpha of a sampled tree block, per row: the sum over the levels whose candidates
    were tested of sum_v min(p_u, q_u) at the node u they hang from (one candidate's acceptance
    probability), and the number of such levels; ``[B]`` each. Shapes as ``verify_tree``."""
    batch, depth = path.shape
    device = path.device
    root = torch.zeros(batch, 1, dtype=torch.long, device=device)
    parents = torch.cat([root, path[:, :-1] + 1], dim=1)  # input column of each level's u
    columns = torch.tensor(tree.draft_columns, device=device)[parents]  # -1: u is a leaf
    level = torch.arange(depth, device=device).unsqueeze(0)
    tested = ((level <= num_accepted.unsqueeze(1)) & (level < max_accepted.unsqueeze(1))
              & (columns >= 0))
    rows = torch.arange(batch, device=device).unsqueeze(1)
    alpha = analytic_acceptance(target_probs[rows, parents], draft_probs[rows, columns.clamp_min(0)])
    return (alpha * tested).sum(dim=1, dtype=torch.float64), tested.sum(dim=1)

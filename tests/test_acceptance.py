"""The acceptance rule as a pure function: distribution tests on a toy vocabulary, no model."""

from __future__ import annotations

import pytest
import torch

from distillspec.decoding import acceptance
from distillspec.decoding.acceptance import (
    acceptance_probability,
    analytic_acceptance,
    f_exp,
    f_lin,
    f_sq,
    residual_distribution,
    verify,
    verify_tree,
)
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampled_tree import sampled_tree_outcome
from distillspec.decoding.sampling import sample
from distillspec.decoding.tree import Tree

TRIALS = 200_000
V = 6


def toy_distributions(gamma: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(gamma + 1, V, generator=generator) * 1.5, dim=-1)
    draft = torch.softmax(torch.randn(gamma, V, generator=generator) * 1.5, dim=-1)
    return target, draft


def run_trials(target, draft, trials=TRIALS, seed=1, **rule):
    """Draft ``trials`` independent blocks from ``draft`` and verify them against ``target``."""
    generator = torch.Generator().manual_seed(seed)
    draft_probs = draft.expand(trials, *draft.shape)
    draft_tokens = sample(draft_probs, generator)
    target_probs = target.expand(trials, *target.shape)
    return draft_tokens, verify(
        draft_tokens, draft_probs, target_probs, generator=generator, **rule
    )


def first_emitted(draft_tokens, outcome):
    """The first token each block emits: x_1 if accepted, else the replacement."""
    return torch.where(outcome.num_accepted > 0, draft_tokens[:, 0], outcome.next_tokens)


def second_emitted(draft_tokens, outcome):
    """The second token, for blocks that accepted x_1."""
    keep = outcome.num_accepted >= 1
    second = torch.where(outcome.num_accepted >= 2, draft_tokens[:, 1], outcome.next_tokens)
    return second[keep]


def tv(samples, distribution):
    empirical = torch.bincount(samples, minlength=distribution.shape[-1]).float() / len(samples)
    return 0.5 * (empirical - distribution).abs().sum().item()


@pytest.mark.parametrize("gamma", [1, 3])
def test_lossless_output_follows_target(gamma):
    target, draft = toy_distributions(gamma)
    draft_tokens, outcome = run_trials(target, draft)
    # Sampling noise for 2e5 draws over 6 cells is ~0.003 in TV; a wrong rule is >> 0.02.
    assert tv(first_emitted(draft_tokens, outcome), target[0]) < 0.01
    if gamma > 1:
        assert tv(second_emitted(draft_tokens, outcome), target[1]) < 0.01
    bonus = outcome.next_tokens[outcome.num_accepted == gamma]
    assert tv(bonus, target[gamma]) < 0.02


def test_acceptance_matches_sum_of_min():
    target, draft = toy_distributions(1, seed=3)
    _, outcome = run_trials(target, draft)
    empirical = outcome.accepted_mask[:, 0].float().mean().item()
    assert empirical == pytest.approx(analytic_acceptance(target[0], draft[0]).item(), abs=0.005)


def test_a_wrong_rule_fails_the_same_bound():
    """Negative control: drawing the replacement from p instead of the residual is biased."""
    target, draft = toy_distributions(1)
    generator = torch.Generator().manual_seed(1)
    draft_tokens = sample(draft.expand(TRIALS, 1, V), generator)
    accept = torch.rand(TRIALS, generator=generator) < acceptance_probability(
        target[0][draft_tokens[:, 0]], draft[0][draft_tokens[:, 0]]
    )
    wrong = torch.where(accept, draft_tokens[:, 0], sample(target[0].expand(TRIALS, V), generator))
    assert tv(wrong, target[0]) > 0.02


def test_greedy_accepts_while_argmax_agrees():
    target = torch.zeros(2, 4, 5)
    target[:, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 1.0  # target argmax 1,2,3,4
    draft_tokens = torch.tensor([[1, 2, 0], [1, 2, 3]])
    draft = torch.nn.functional.one_hot(draft_tokens, 5).float()
    outcome = verify(draft_tokens, draft, target)
    assert outcome.num_accepted.tolist() == [2, 3]
    assert outcome.next_tokens.tolist() == [3, 4]  # correction, then bonus


def test_residual_is_normalised_positive_part():
    target = torch.tensor([0.5, 0.3, 0.2])
    draft = torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual_distribution(target, draft), torch.tensor([1.0, 0.0, 0.0]))
    same = residual_distribution(target, target)
    torch.testing.assert_close(same, target)  # no residual mass: fall back to p


def test_lenience_functions():
    p = torch.tensor([0.0, 0.25, 0.5])
    torch.testing.assert_close(f_lin(p, 0.5), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(f_sq(p, 0.5), torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(f_exp(p, 0.5), torch.tensor([0.0, 0.5, 0.5**0.5]))


@pytest.mark.parametrize("lenience", ["lin", "sq", "exp"])
def test_acceptance_grows_as_epsilon_falls(lenience):
    target, draft = toy_distributions(3, seed=5)
    rates = []
    for epsilon in (1.0, 0.7, 0.4, 0.1):
        _, outcome = run_trials(target, draft, trials=50_000, lenience=lenience, epsilon=epsilon)
        rates.append(outcome.num_accepted.float().mean().item())
    assert all(later > earlier for earlier, later in zip(rates, rates[1:])), rates


@pytest.mark.parametrize("lenience", ["lin", "sq", "exp"])
def test_epsilon_one_is_exactly_lossless(lenience):
    target, draft = toy_distributions(3, seed=2)
    lossless = run_trials(target, draft, trials=5000)[1]
    lenient = run_trials(target, draft, trials=5000, lenience=lenience, epsilon=1.0)[1]
    assert torch.equal(lossless.num_accepted, lenient.num_accepted)
    assert torch.equal(lossless.next_tokens, lenient.next_tokens)


def test_greedy_fast_path_equals_the_rule_on_one_hot_distributions():
    from distillspec.decoding.acceptance import verify_greedy

    generator = torch.Generator().manual_seed(5)
    batch, gamma, vocab = 64, 4, 7
    target_tokens = torch.randint(0, vocab, (batch, gamma + 1), generator=generator)
    # drafts that agree with the target for a random prefix, then diverge (or not)
    draft_tokens = torch.where(
        torch.rand(batch, gamma, generator=generator) < 0.7,
        target_tokens[:, :gamma],
        torch.randint(0, vocab, (batch, gamma), generator=generator),
    )
    lengths = torch.randint(0, gamma + 1, (batch,), generator=generator)
    one_hot = lambda t: torch.nn.functional.one_hot(t, vocab).float()  # noqa: E731
    full = verify(draft_tokens, one_hot(draft_tokens), one_hot(target_tokens),
                  draft_lengths=lengths, generator=generator)
    fast = verify_greedy(draft_tokens, target_tokens, lengths)
    assert torch.equal(full.num_accepted, fast.num_accepted)
    assert torch.equal(full.next_tokens, fast.next_tokens)
    assert torch.equal(full.accepted_mask, fast.accepted_mask)


# -- several candidates per position: a sampled tree, SpecInfer's multi-step rule ---------------


def tree_case(seed=0):
    """p and q after the root, and after each token (``[V, V]`` tables: row t = after t)."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.softmax(torch.randn(*shape, generator=generator) * 1.5, -1)  # noqa: E731
    return draw(V), draw(V), draw(V, V), draw(V, V)


def run_tree_trials(tree, case, trials=TRIALS, seed=1, sampled_from=None, replacement=False,
                    through=None, **rule):
    """Draw each node's children from q after it, without replacement in child order
    (``torch.multinomial``, independent of the code under test), or i.i.d. with
    ``replacement``; ``sampled_from``: from another q than the one the rule is given. Verify all
    ``trials`` trees at once: with ``verify_tree``, or ``through`` "eager" / "compiled"
    ``sampled_tree_outcome`` given log p as the target's logits (T = 1 warps them back to p)."""
    target_root, draft_root, target_next, draft_next = case
    source_root, source_next = sampled_from or (draft_root, draft_next)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(trials, tree.size, dtype=torch.long)
    for parent in (-1, *tree.internal):
        children = [n for n, p in enumerate(tree.parent) if p == parent]
        probs = source_root.expand(trials, V) if parent < 0 else source_next[tokens[:, parent]]
        tokens[:, children] = torch.multinomial(probs, len(children), replacement=replacement,
                                                generator=generator)
    draft_probs = torch.stack(
        [draft_root.expand(trials, V)] + [draft_next[tokens[:, n]] for n in tree.internal], dim=1)
    target_probs = torch.stack(
        [target_root.expand(trials, V)] + [target_next[tokens[:, n]] for n in range(tree.size)],
        dim=1)
    if through is None:
        return tokens, verify_tree(tree, tokens, draft_probs, target_probs, generator=generator,
                                   **rule)
    uniforms = torch.rand(trials, tree.size + 1, generator=generator)
    outcome = sampled_tree_outcome(
        tree, tokens, draft_probs, target_probs.log(), [SamplingConfig(temperature=1.0)] * trials,
        vocab=V, max_accepted=rule.pop("max_accepted", torch.full((trials,), tree.depth)),
        lenience=rule.pop("lenience", None), epsilon=rule.pop("epsilon", 1.0),
        uniforms=(uniforms[:, :-1], uniforms[:, -1]), compiled=through == "compiled")
    assert not rule, f"run_tree_trials does not pass {sorted(rule)} through sampled_tree_outcome"
    return tokens, outcome[:3]


def test_sampled_tree_outcome_compiled_equals_eager_with_a_temperature_per_row():
    """The compiled temperature-only path (temperatures a tensor, one per row) gives the eager
    ``warp_rows`` path's results on the same uniforms, lenient or not."""
    tree = Tree.parse("0,1,0.0,0.1,1.0")
    generator = torch.Generator().manual_seed(3)
    rows = 64
    logits = torch.randn(rows, tree.size + 1, V, generator=generator) * 2
    draft_probs = torch.softmax(torch.randn(rows, 1 + len(tree.internal), V,
                                            generator=generator), -1)
    tokens = torch.randint(0, V, (rows, tree.size), generator=generator)
    tokens[:, 1] = (tokens[:, 0] + 1) % V  # siblings distinct
    uniforms = torch.rand(rows, tree.size + 1, generator=generator)
    samplings = [SamplingConfig(temperature=t) for t in (0.7, 1.3)] * (rows // 2)
    for lenience, epsilon in ((None, 1.0), ("lin", 0.5)):
        eager, compiled = (sampled_tree_outcome(
            tree, tokens, draft_probs.clone(), logits, samplings, vocab=V,
            max_accepted=torch.full((rows,), 2), lenience=lenience, epsilon=epsilon,
            uniforms=(uniforms[:, :-1], uniforms[:, -1]), compiled=on) for on in (False, True))
        for a, b in zip(eager[:3], compiled[:3]):
            assert torch.equal(a, b)
        assert torch.allclose(eager[3], compiled[3]) and torch.equal(eager[4], compiled[4])


def test_a_sampled_tree_row_alone_gets_what_it_gets_among_many():
    """On the CPU the eager rule stops trying siblings once no row tries one any more (a row
    alone stops at its first acceptance, a row among many goes on with the others): each row's
    path, count and token are the same either way, on the same uniforms, lenient or not."""
    tree = Tree.parse("0,1,2,0.0,0.1,0.0.0")  # widths 3, 2, 1; tokens distinct within V
    generator = torch.Generator().manual_seed(5)
    rows = 300
    draft_probs = torch.softmax(torch.randn(rows, 1 + len(tree.internal), V,
                                            generator=generator), -1)
    target_probs = torch.softmax(3 * torch.randn(rows, tree.size + 1, V, generator=generator),
                                 -1)
    tokens = torch.stack([torch.randperm(V, generator=generator)[: tree.size] for _ in range(rows)])
    uniforms = torch.rand(rows, tree.size + 1, generator=generator)
    for lenience, epsilon in ((None, 1.0), ("lin", 0.5)):
        rule = dict(lenience=lenience, epsilon=epsilon, max_accepted=torch.full((rows,), 3))
        together = verify_tree(tree, tokens, draft_probs.clone(), target_probs,
                               uniforms=(uniforms[:, :-1], uniforms[:, -1]), **rule)
        counts = together[1].bincount(minlength=tree.depth + 1)
        assert (counts > 0).all(), counts  # rows stop at every depth
        for row in range(0, rows, 7):
            one = slice(row, row + 1)
            alone = verify_tree(tree, tokens[one], draft_probs[one].clone(), target_probs[one],
                                uniforms=(uniforms[one, :-1], uniforms[one, -1]),
                                lenience=lenience, epsilon=epsilon,
                                max_accepted=torch.full((1,), 3))
            for a, b in zip(alone, together):
                assert torch.equal(a[0], b[row]), (row, alone, [t[row] for t in together])


def test_the_sampled_tree_rule_traces_into_one_graph():
    """The compiled rule reads the tree's tables as plain attributes: a cached_property's lock
    broke the graph in five (each break a return to Python between graphs; 0.9 ms of a 31 ms
    T = 1 tree step against 0.6 ms after, measured in a real step on the 2-core Xeon)."""
    from distillspec.decoding.sampled_tree import RuleInputs, _tempered_rule

    tree = Tree.parse("4:1")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, tree.size + 1, V, generator=generator)
    draft_probs = torch.softmax(torch.randn(1, 1, V, generator=generator), -1)
    tokens = torch.randperm(V, generator=generator)[: tree.size].unsqueeze(0)
    inputs = RuleInputs(torch.tensor([1]), None, 1.0, torch.rand(1, tree.size), torch.rand(1))
    explained = torch._dynamo.explain(_tempered_rule)(
        tree, tokens, draft_probs, logits, torch.tensor([1.0]), V, inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def emitted(tokens, outcome, position):
    """The ``position``-th token each block emits (-1 where the block emitted fewer)."""
    path, count, next_tokens = outcome
    node = path[:, min(position, path.shape[1] - 1)].clamp_min(0)
    drafted = tokens.gather(1, node.unsqueeze(1)).squeeze(1)
    token = torch.where(count > position, drafted, next_tokens)
    return torch.where(count >= position, token, -1)


def conditional_tv(previous, following, table):
    """sum_t P(previous = t) TV(following | previous = t, table[t]) over rows with both."""
    keep = following >= 0
    previous, following = previous[keep], following[keep]
    total = 0.0
    for token in range(V):
        chosen = following[previous == token]
        if len(chosen):
            total += len(chosen) / len(previous) * tv(chosen, table[token])
    return total


def multi_draft_acceptance(target, draft, candidates):
    """P(one of k i.i.d. candidates is accepted) = 1 - prod_j (1 - sum min(r_j, q)),
    r_1 = p, r_{j+1} = norm(max(0, r_j - q)): SpecInfer's rule with replacement."""
    rejected, residual = 1.0, target
    for _ in range(candidates):
        rejected *= 1.0 - analytic_acceptance(residual, draft).item()
        residual = residual_distribution(residual, draft)
    return 1.0 - rejected


def without_replacement_acceptance(target, draft, candidates):
    """P(one of k candidates drawn without replacement is accepted), by enumerating every
    draw: sum_x q(x) [a(x) + (1 - a(x)) P(rest | r', q without x)], a = min(1, r(x) / q(x)),
    r' = norm(max(0, r - q)); plain float arithmetic, no code under test."""
    if candidates == 0 or draft.sum() <= 0:
        return 0.0
    draft = draft / draft.sum()
    residual = (target - draft).clamp_min(0)
    residual = residual / residual.sum() if residual.sum() > 0 else target
    total = 0.0
    for token in range(V):
        q = draft[token].item()
        if q <= 0:
            continue
        accept = min(1.0, target[token].item() / q)
        rest = draft.clone()
        rest[token] = 0.0
        total += q * (accept + (1 - accept)
                      * without_replacement_acceptance(residual, rest, candidates - 1))
    return total


def test_multi_draft_rule_output_follows_target_at_one_node():
    """Three candidates drawn without replacement: all distinct, the emitted token follows p,
    a candidate is accepted as often as the enumerated rule predicts, and more often than with
    three i.i.d. candidates (what the draws without replacement gain)."""
    tree = Tree.parse("0,1,2")
    case = tree_case(0)
    tokens, outcome = run_tree_trials(tree, case)
    assert bool((tokens[:, 0] != tokens[:, 1]).all() & (tokens[:, 1] != tokens[:, 2]).all())
    assert tv(emitted(tokens, outcome, 0), case[0]) < 0.01
    expected = without_replacement_acceptance(case[0], case[1], 3)
    assert (outcome[1] > 0).float().mean().item() == pytest.approx(expected, abs=0.005)
    assert expected > multi_draft_acceptance(case[0], case[1], 3) + 0.02
    assert expected > analytic_acceptance(case[0], case[1]).item() + 0.1  # more than one draft


@pytest.mark.parametrize(("spec", "through"), [("0,1,0.0,0.1,1.0", None),
                                               ("0,0.0,0.1,0.2", None),
                                               ("0,1,0.0,0.1,1.0", "eager"),
                                               ("0,1,0.0,0.1,1.0", "compiled")])
def test_multi_draft_rule_follows_target_along_tree_paths(spec, through):
    """Two levels: the first token follows p, the second p(. | first), the third (the bonus
    after a full path) p(. | second); also when a cap stops rows after one token. ``through``:
    the strategies' entry (the target's warp, the rule, its analytic alpha), eager and as the
    compiled function that runs beside compiled steps."""
    tree = Tree.parse(spec)
    case = tree_case(1)
    tokens, outcome = run_tree_trials(tree, case, through=through)
    first, second, third = (emitted(tokens, outcome, i) for i in range(3))
    assert tv(first, case[0]) < 0.01
    assert conditional_tv(first, second, case[2]) < 0.015
    assert conditional_tv(second, third, case[2]) < 0.02
    caps = torch.randint(0, 3, (TRIALS,), generator=torch.Generator().manual_seed(2))
    tokens, outcome = run_tree_trials(tree, case, max_accepted=caps, through=through)
    assert bool((outcome[1] <= caps).all()) and bool((outcome[1] == caps).any())
    first, second = emitted(tokens, outcome, 0), emitted(tokens, outcome, 1)
    assert tv(first, case[0]) < 0.01
    assert conditional_tv(first, second, case[2]) < 0.015


def test_wrong_multi_draft_rules_fail_the_same_bound(monkeypatch):
    """Negative controls: (a) the rule given q while the candidates came from a sharper q
    (temperature 0.5), (b) i.i.d. candidates given to the rule for draws without replacement,
    (c) testing every candidate against p itself (no residual): all biased."""
    tree = Tree.parse("0,1,2")
    case = tree_case(0)
    sharper = torch.softmax(case[1].log() / 0.5, -1), torch.softmax(case[3].log() / 0.5, -1)
    tokens, outcome = run_tree_trials(tree, case, sampled_from=sharper)
    assert tv(emitted(tokens, outcome, 0), case[0]) > 0.03
    tokens, outcome = run_tree_trials(tree, case, replacement=True)
    assert tv(emitted(tokens, outcome, 0), case[0]) > 0.03
    monkeypatch.setattr(acceptance, "_rejected_residual",
                        lambda residual, residual_mass, *rest: (residual, residual_mass))
    tokens, outcome = run_tree_trials(tree, case)
    assert tv(emitted(tokens, outcome, 0), case[0]) > 0.03


def test_multi_draft_rule_cases_by_hand():
    """p = q: the first child is always accepted, down to the cap. When the first child used
    up q's support (q one-hot), its sibling is never tested; the last token avoids the
    rejected one."""
    tree = Tree.parse("0,1,0.0")  # nodes (0,) (1,) (0, 0); internal: (0,)
    same = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(3)), -1)
    path, count, _ = verify_tree(tree, torch.tensor([[1, 2, 3]] * 4), same.expand(4, 2, V),
                                 same.expand(4, 4, V), max_accepted=torch.tensor([0, 1, 2, 2]))
    assert count.tolist() == [0, 1, 2, 2]
    assert path.tolist() == [[-1, -1], [0, -1], [0, 2], [0, 2]]
    rows = 500
    target = torch.full((rows, 4, V), 1.0 / V)
    draft = torch.zeros(rows, 2, V)
    draft[:, :, 4] = 1.0  # both root children are token 4, where q = 1 > p = 1/6
    accept_uniforms = torch.tensor([[0.5, 0.0, 0.0]]).expand(rows, 3)  # 0.5 > p/q: rejected
    final_uniforms = torch.rand(rows, generator=torch.Generator().manual_seed(4))
    path, count, next_tokens = verify_tree(tree, torch.tensor([[4, 4, 0]]).expand(rows, 3),
                                           draft, target, uniforms=(accept_uniforms,
                                                                    final_uniforms))
    assert bool((count == 0).all()) and not bool((next_tokens == 4).any())
    assert len(set(next_tokens.tolist())) == V - 1


def test_the_trees_unnormalised_residual_is_the_residual_distribution():
    """``_rejected_residual`` keeps r = R / Z and q_j = Q / M unnormalised: R' / Z' equals
    ``residual_distribution(r, q_j)`` on rejected rows, r elsewhere, and r again where r = q_j
    (no mass left)."""
    from distillspec.decoding.acceptance import _rejected_residual

    generator = torch.Generator().manual_seed(5)
    target = torch.softmax(torch.randn(4, V, generator=generator), -1)
    remaining = torch.softmax(torch.randn(4, V, generator=generator), -1)
    remaining[:, 0] = 0.0  # a sibling already drawn: Q is q_u without it, M its mass
    remaining[3] = target[3]  # r = q_j on row 3: nothing left after rejecting
    mass = remaining.sum(-1, keepdim=True)
    residual, residual_mass = target * 3.0, torch.full((4, 1), 3.0)  # r as (R, Z)
    residual[3], residual_mass[3] = target[3], mass[3]
    rejected = torch.tensor([True, False, True, True])
    updated, updated_mass = _rejected_residual(residual, residual_mass, remaining, mass, rejected)
    got = updated / updated_mass
    torch.testing.assert_close(got[0], residual_distribution(target[0], remaining[0] / mass[0]))
    torch.testing.assert_close(got[2], residual_distribution(target[2], remaining[2] / mass[2]))
    torch.testing.assert_close(got[1], target[1])
    torch.testing.assert_close(got[3], target[3])
    torch.testing.assert_close(got.sum(-1), torch.ones(4))

"""Token trees for speculative decoding (SpecInfer / Medusa / EAGLE-2's idea), pure parts.

A chain drafts one token per position, so a block ends at the first position where the draft's
top-1 token is not the target's. A tree also proposes the draft's 2nd, 3rd, ... most likely
tokens at a position, and children of those, and the target scores every node in **one**
forward pass (each node attends to its ancestors only, at the position of its depth). The
accepted path is the longest chain of nodes that each equal the target's argmax after their
parent; the token after it is the target's argmax there. So the output is exactly the target's
greedy decoding, whatever the tree, and a block gains a token whenever the target's choice is
among the draft's top few rather than only its top 1. On a machine where a verify of 16 tokens
costs little more than one of 2 (measured: ``CostModel.verify_cost``), that is nearly free.

A tree is a set of *rank paths*: ``(0,)`` is the draft's top-1 token after the pending token,
``(1,)`` its second choice, ``(0, 2)`` the third choice after ``(0,)``, and so on. Every prefix
of a path is in the tree. Node ``n`` has ``parent[n]`` (-1 = the root, the pending token),
``rank[n]`` among its parent's children and ``depth[n]`` (1 for the root's children).

Sampled rows (temperature > 0) use the same tree shape with other nodes: the children of a
node are samples without replacement from the draft's warped q after it (its r-th child = the
r-th draw), and ``acceptance.verify_tree`` checks them with SpecInfer's multi-step speculative
sampling in its without-replacement form, so their output follows the target's distribution
exactly. Greedy and sampled rows share a step, each with its own rule (``Decoder``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: parsing a --tree flag needs none
    import torch

MAX_TREE_NODES = 64  # one verify of 65 tokens: past the flat part of every verify curve measured
MAX_TREE_RANK = 32

# How often the target's greedy token has draft rank r (r = 0, 1, ...), measured teacher-forced
# along the target's own greedy answers: the demo's 3-layer SmolLM2-135M draft (8k head, 12 min
# of distillation) on all 115 hand-written chat prompts, 64 tokens each (docs/results, "Token
# trees"). Only the order of paths it implies matters (``best_first``), so a draft with higher or
# lower agreement gets the same shape of tree for a given node count.
RANK_PROFILE = (0.329, 0.103, 0.054, 0.033, 0.026, 0.020, 0.014, 0.013,
                0.010, 0.011, 0.010, 0.009, 0.008, 0.006, 0.008, 0.005)


def _derive(paths: tuple[tuple[int, ...], ...]) -> dict:
    """The tables of a tree whose ``paths`` are sorted by depth, then rank (``Tree``'s derived
    fields, by name)."""
    index = {path: n for n, path in enumerate(paths)}
    parent = tuple(index[p[:-1]] if len(p) > 1 else -1 for p in paths)
    rank = tuple(p[-1] for p in paths)
    parents = set(parent)
    internal = tuple(n for n in range(len(paths)) if n in parents)
    children: list[list[int]] = [[] for _ in range(len(paths) + 1)]
    for node, above in enumerate(parent):  # nodes are sorted: siblings in rank order
        children[above + 1].append(node)
    width = max(map(len, children))
    column = {node: 1 + i for i, node in enumerate(internal)}
    depths = tuple(len(p) for p in paths)
    # the most children of any node one level up (the root for depth 0): a level's sibling
    # passes stop there, not at the widest level's count
    above = [[-1]] + [[n for n, d in enumerate(depths) if d == level]
                      for level in range(1, max(depths))]
    return dict(
        depth=max(depths),
        level_widths=tuple(max(len(children[n + 1]) for n in nodes) for nodes in above),
        parent=parent,
        rank=rank,
        depths=depths,
        internal=internal,
        top1_parents=frozenset(p for p, r in zip(parent, rank) if r == 0),
        child_table=tuple(tuple(c + [-1] * (width - len(c))) for c in children),
        draft_columns=(0, *(column.get(n, -1) for n in range(len(paths)))),
    )


@dataclass(frozen=True)
class Tree:
    """A static draft tree: node ``n`` is the ``rank[n]``-th most likely draft token after its
    parent (``parent[n]`` = -1: after the pending token); nodes are ordered by depth.

    ``spec`` is the text it was parsed from (``--tree``, a YAML list, a saved report), kept for
    reports and labels; a tree built from paths spells its paths. Parse a setting once, at the
    boundary (``SpeculationConfig``, a tool's config), and pass the ``Tree`` on."""

    paths: tuple[tuple[int, ...], ...]
    spec: str = field(default="", compare=False, repr=False)
    # Derived from the paths once, in __post_init__ (``_derive``), and plain attributes: a
    # compiled rule reads them without tracing a cached_property, whose lock breaks its graph.
    depth: int = field(init=False, compare=False, repr=False)
    parent: tuple[int, ...] = field(init=False, compare=False, repr=False)
    rank: tuple[int, ...] = field(init=False, compare=False, repr=False)
    depths: tuple[int, ...] = field(init=False, compare=False, repr=False)
    # nodes with children, in order: the draft must read them to propose their children
    internal: tuple[int, ...] = field(init=False, compare=False, repr=False)
    # per depth d: the most children a node at depth d - 1 (the root for d = 0) has
    level_widths: tuple[int, ...] = field(init=False, compare=False, repr=False)
    # nodes (-1: the root) whose children include the draft's top-1 token
    top1_parents: frozenset[int] = field(init=False, compare=False, repr=False)
    # row c (an input column: 0 = the root, n + 1 = node n): that node's children in rank
    # order, padded with -1 to the widest node's child count
    child_table: tuple[tuple[int, ...], ...] = field(init=False, compare=False, repr=False)
    # per input column: which draft distribution the node's children come from, 0 = the
    # root's, 1 + i = ``internal[i]``'s; -1 for a leaf
    draft_columns: tuple[int, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        paths = self.paths
        if not paths:
            raise ValueError("A tree needs at least one node, e.g. '1' (the draft's top token).")
        if len(paths) > MAX_TREE_NODES:
            raise ValueError(
                f"A tree of {len(paths)} nodes is more than {MAX_TREE_NODES}: a verify that wide "
                "costs more than the tokens it can gain. Use fewer nodes."
            )
        if len(set(paths)) != len(paths):
            raise ValueError(f"Tree paths repeat: {format_paths(paths)}. List each node once.")
        known = set(paths)
        for path in paths:
            if not path or any(not 0 <= r < MAX_TREE_RANK for r in path):
                raise ValueError(
                    f"Tree path {format_paths([path])!r} is not a list of draft ranks in "
                    f"[0, {MAX_TREE_RANK}). Write paths as ranks joined by '.', e.g. '0,1,0.0'."
                )
            if len(path) > 1 and path[:-1] not in known:
                raise ValueError(
                    f"Tree path {format_paths([path])} has no parent {format_paths([path[:-1]])}"
                    ": every prefix of a path must be a node too."
                )
        ordered = tuple(sorted(paths, key=lambda p: (len(p), p)))
        object.__setattr__(self, "paths", ordered)
        for name, value in _derive(ordered).items():
            object.__setattr__(self, name, value)
        if not self.spec:
            object.__setattr__(self, "spec", format_paths(ordered))

    @classmethod
    def parse(cls, spec: str) -> Tree | DynamicTree | None:
        """``""`` -> None (chain); ``"N"`` or ``"N:D"`` -> ``best_first(N, D)``;
        ``"dyn:N[:D[:K]]"`` -> a ``DynamicTree``; otherwise rank paths joined by commas (or
        ``/``, for lists whose items commas separate), ranks joined by dots:
        ``"0,1,2,0.0,0.1,1.0"`` = ``"0/1/2/0.0/0.1/1.0"``."""
        text, spec = spec, spec.strip().replace("/", ",")
        if not spec:
            return None
        if spec.startswith(DynamicTree.PREFIX):
            return DynamicTree.parse(text)
        head, _, depth = spec.partition(":")
        if head.isdigit() and (not depth or depth.isdigit()):
            return replace(best_first(int(head), int(depth) if depth else None), spec=text)
        try:
            paths = [tuple(int(r) for r in part.split(".")) for part in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"tree must be '' (chain), a node count 'N' or 'N:D' (at most depth D), or rank "
                f"paths such as '0,1,0.0,0.1'; got {spec!r}."
            ) from None
        return cls(tuple(paths), text)

    @property
    def size(self) -> int:
        return len(self.paths)

    def level(self, depth: int) -> tuple[int, ...]:
        return tuple(n for n, d in enumerate(self.depths) if d == depth)

    def children_topk(self, parent: int) -> tuple[tuple[int, ...], int]:
        """``(children, k)``: the nodes under ``parent`` and how many top tokens they need."""
        children = tuple(n for n, p in enumerate(self.parent) if p == parent)
        return children, max((self.rank[n] for n in children), default=-1) + 1

    def ancestors(self, nodes: Sequence[int]) -> torch.Tensor:
        """``[len(nodes), len(nodes)]`` bool: entry (i, j) = node j is node i or its ancestor.

        Entries use -1 for the root; the root is an ancestor of every node."""
        import torch

        position = {node: i for i, node in enumerate(nodes)}
        visible = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
        for i, node in enumerate(nodes):
            current = node
            while True:
                if current in position:
                    visible[i, position[current]] = True
                if current == -1:
                    break
                current = self.parent[current]
        return visible

    def __str__(self) -> str:
        return format_paths(self.paths)


@dataclass(frozen=True)
class DynamicTree:
    """A tree grown per row and per block from the draft's own confidence (EAGLE-2, Li et al.
    2024, "dynamic draft trees"): ``depth`` draft calls; each call after the first feeds the
    ``top_k`` candidates of the newest level with the highest path probability (the product of
    the draft's probabilities along the path, i.e. its estimate that the target accepts the
    whole path) and gives each its ``top_k`` most likely children; then the ``nodes`` candidates
    of highest path probability, over all levels, form the tree the target verifies. A node's
    path probability is at most its parent's, so the chosen set holds every chosen node's
    ancestors (ties: the shallower node first).

    That is for greedy rows. Choosing among a sampled row's draws of q by their q would bias
    them (the multi-draft rule is exact for unselected draws), so a sampled row in the same
    block feeds and verifies a layout fixed in advance by the rank profile
    (``dynamic_tree.prior_plan``), a static tree checked with the same rule."""

    PREFIX = "dyn"

    nodes: int = 16
    depth: int = 5
    top_k: int = 4
    spec: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_TREE_NODES:
            raise ValueError(
                f"A dynamic tree needs 1..{MAX_TREE_NODES} nodes, got {self.nodes}: its node "
                "budget is the width of every verify. 'dyn:6:2:3' ran best of those measured "
                "on a 2-core CPU."
            )
        if not 1 <= self.depth <= MAX_TREE_NODES or not 1 <= self.top_k <= MAX_TREE_RANK:
            raise ValueError(
                f"A dynamic tree's depth must be in [1, {MAX_TREE_NODES}] and its top-k in "
                f"[1, {MAX_TREE_RANK}]; got depth {self.depth}, top-k {self.top_k}. Write "
                "'dyn:N:D:K', e.g. 'dyn:16:5:4'."
            )
        if self.nodes > self.candidates:
            raise ValueError(
                f"A dynamic tree of depth {self.depth} and top-k {self.top_k} proposes only "
                f"{self.candidates} candidates, fewer than its {self.nodes} nodes. Raise the "
                "depth or the top-k, or lower the node count."
            )
        if not self.spec:
            object.__setattr__(self, "spec", f"{self.PREFIX}:{self.nodes}:{self.depth}:{self.top_k}")

    @classmethod
    def parse(cls, spec: str) -> DynamicTree:
        """``"dyn:N"``, ``"dyn:N:D"`` or ``"dyn:N:D:K"`` (defaults D = 5, K = 4)."""
        head, *numbers = spec.strip().split(":")
        if head != cls.PREFIX or not 1 <= len(numbers) <= 3 or not all(
                n.strip().isdigit() for n in numbers):
            raise ValueError(
                f"A dynamic tree is written 'dyn:N[:D[:K]]' (N nodes, depth D, top-k K), e.g. "
                f"'dyn:16:5:4'; got {spec!r}."
            )
        return cls(*(int(n) for n in numbers), spec=spec.strip())

    @property
    def size(self) -> int:
        return self.nodes

    @property
    def candidates(self) -> int:
        """Candidates a block proposes: ``top_k`` after the root, ``top_k ** 2`` per later call."""
        return self.top_k + (self.depth - 1) * self.top_k**2

    def __str__(self) -> str:
        return self.spec


def format_paths(paths: Sequence[Sequence[int]]) -> str:
    return ",".join(".".join(str(r) for r in path) for path in paths)


def best_first(nodes: int, max_depth: int | None = None,
               profile: Sequence[float] = RANK_PROFILE) -> Tree:
    """The ``nodes`` rank paths of highest prior probability ``prod_i profile[r_i]`` (depth at
    most ``max_depth``): the tree that maximises expected accepted tokens under the assumption
    that a draft's ranks at successive positions are independent with these frequencies."""
    if not 1 <= nodes <= MAX_TREE_NODES:
        raise ValueError(
            f"A tree needs 1..{MAX_TREE_NODES} nodes, got {nodes}. A bare number is a node count "
            "('1' is the top-1 token alone); explicit rank paths need a comma, e.g. '0,1'."
        )
    if max_depth is not None and max_depth < 1:
        raise ValueError(f"A tree's depth must be >= 1, got {max_depth}.")
    chosen: list[tuple[int, ...]] = []
    frontier = {(r,): profile[r] for r in range(len(profile))}
    while len(chosen) < nodes and frontier:
        path = max(frontier, key=lambda p: (frontier[p], [-r for r in p]))
        weight = frontier.pop(path)
        chosen.append(path)
        if max_depth is None or len(path) < max_depth:
            frontier.update({path + (r,): weight * profile[r] for r in range(len(profile))})
    return Tree(tuple(chosen))


def tree_node_tokens(tree: Tree, parent_logits: torch.Tensor, parent: int,
                     node_tokens: torch.Tensor, kept_ids: torch.Tensor | None = None) -> None:
    """Fill ``node_tokens [B, N]`` for the children of ``parent`` from the draft's logits after
    it (``[B, V]``): child n gets the ``rank[n]``-th largest logit's id, over ``kept_ids`` only
    when given and at least k (a pruned head: ``sampling.top_ids``). Ties between equal logits
    are broken by ``topk``; siblings stay distinct ids."""
    import torch

    from distillspec.decoding.sampling import top_ids

    children, k = tree.children_topk(parent)
    if not children:
        return
    top = top_ids(parent_logits, k, kept_ids)
    ranks = torch.tensor([tree.rank[n] for n in children], device=top.device)
    node_tokens[:, list(children)] = top[:, ranks]


def tree_node_samples(tree: Tree, parent_probs: torch.Tensor, parent: int,
                      uniforms: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor | None]:
    """The children of ``parent`` for sampled rows: ``(children, tokens [S, k])``, drawn without
    replacement from ``parent_probs [S, V]`` (the warped q the rule divides by) in child order,
    child n's draw at ``uniforms[:, n]`` (``sampling.sample_without_replacement``)."""
    from distillspec.decoding.sampling import sample_without_replacement

    children, _ = tree.children_topk(parent)
    if not children:
        return children, None
    return children, sample_without_replacement(parent_probs, uniforms[:, list(children)])


def accept_tree_greedy(
    tree: Tree,
    node_tokens: torch.Tensor,
    target_tokens: torch.Tensor,
    max_accepted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The greedy acceptance rule on a tree, per row.

    ``node_tokens [B, N]``: the drafted token of each node; ``target_tokens [B, N + 1]``: the
    target's argmax after the root (column 0) and after each node (column n + 1). Starting at the
    root, move to the child whose token is the target's argmax after the current node, while one
    exists and fewer than ``max_accepted[b]`` nodes are accepted.

    Returns ``(path [B, depth], num_accepted [B], next_tokens [B])``: the accepted nodes in order
    (-1 past the end), how many, and the target's argmax after the last one (the token every
    block ends with: a correction where the path stopped, or the bonus).
    """
    import torch

    batch = node_tokens.shape[0]
    device = node_tokens.device
    parent = torch.tensor(tree.parent, device=device) + 1  # input column of each node's parent
    rows = torch.arange(batch, device=device)
    current = torch.zeros(batch, dtype=torch.long, device=device)  # input column: 0 = root
    going = torch.ones(batch, dtype=torch.bool, device=device)
    if max_accepted is not None:
        going &= max_accepted > 0
    path = torch.full((batch, tree.depth), -1, dtype=torch.long, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=device)
    for depth in range(1, tree.depth + 1):
        level = torch.tensor(tree.level(depth), device=device)
        wanted = target_tokens[rows, current]  # the target's argmax after the current node
        match = (parent[level].unsqueeze(0) == current.unsqueeze(1)) & (
            node_tokens[:, level] == wanted.unsqueeze(1))
        match &= going.unsqueeze(1)
        found = match.any(dim=1)
        chosen = level[match.to(torch.int8).argmax(dim=1)]  # siblings are distinct: <= 1 match
        path[:, depth - 1] = torch.where(found, chosen, path[:, depth - 1])
        current = torch.where(found, chosen + 1, current)
        num_accepted += found.long()
        going = found
        if max_accepted is not None:
            going &= num_accepted < max_accepted
    return path, num_accepted, target_tokens[rows, current]

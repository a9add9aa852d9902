"""Decoding knobs: how a distribution is warped, and how speculation proposes and accepts.

Plain dataclasses (no torch), so the CLI can build them without importing models. Each validates
itself in ``__post_init__``; the limits are documented here and in ``docs/cli.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distillspec.common.config import knob
from distillspec.decoding.tree import DynamicTree, Tree

LENIENCE_CHOICES = ("none", "lin", "sq", "exp")
COMPILE_CHOICES = ("auto", "on", "off")  # compiled decoding steps (models.compilation)
MAX_GAMMA = 64  # a verify of more tokens never pays; bounds every per-position allocation
MAX_LOOKUP_NGRAM = 16  # prompt lookup's shortest match; longer suffixes rarely repeat
DEFAULT_LOOKUP_NGRAM = 2
MAX_TOP_K = 1 << 20
MAX_TEMPERATURE = 2.0  # the OpenAI API's range, which the server accepts
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(value, name: str = "seed") -> None:
    """Refuse a seed torch's generators cannot take (they hold a signed or unsigned 64-bit
    integer); ``None`` is allowed (no seed). Raises ValueError saying the range."""
    if value is None:
        return
    if not _is_int(value) or not SEED_MIN <= value <= SEED_MAX:
        raise ValueError(
            f"{name} must be an integer in [-2**63, 2**64 - 1] (what torch's random generators "
            f"take), got {value!r}. Use a smaller integer, e.g. 0..2**32."
        )


@dataclass(frozen=True)
class SamplingConfig:
    """How a next-token distribution is warped before sampling (shared by draft and target)."""

    temperature: float = knob(0.0, "Sampling temperature; 0 means greedy (argmax, one-hot).")
    top_k: int = knob(0, "Keep only the k most likely tokens (0 disables).")
    top_p: float = knob(
        1.0, "Nucleus sampling: keep the smallest set with mass >= top_p (1 disables)."
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}. "
                "Use 0 for greedy decoding or a positive value such as 1.0 for sampling."
            )
        if self.temperature < 0.0:
            raise ValueError(
                f"temperature must be >= 0, got {self.temperature}. "
                "Use 0 for greedy decoding or a positive value such as 1.0 for sampling."
            )
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"top_p must be in (0, 1], got {self.top_p}. Use 1.0 to disable nucleus sampling."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SpeculationConfig:
    """The speculative-decoding knobs: lookahead, adaptive drafting and the acceptance rule."""

    gamma: int = knob(
        4, f"Most draft tokens proposed per target call (lookahead, 1..{MAX_GAMMA})."
    )
    confidence_threshold: float = knob(
        0.0,
        "Adaptive drafting: a row stops drafting after a token whose draft probability "
        "(max softmax of the draft's logits) is below this, in [0, 1). 0 always drafts gamma.",
    )
    lenience: str = knob(
        "none",
        "Lossy acceptance: none (lossless), lin (p/eps), sq (p/eps^2) or exp (p^eps).",
        choices=LENIENCE_CHOICES,
    )
    epsilon: float = knob(1.0, "Lenience strength in (0, 1]; 1 is exactly lossless.")
    tree: str = knob(
        "",
        "Tree drafting: the target verifies several draft tokens per position in one pass "
        "(greedy rows: the draft's top few; sampled rows: draws from q without replacement, "
        "checked with the lossless multi-draft rule). 'N' = the N most likely rank paths, 'N:D' = "
        "at most D deep, or explicit paths such as '0,1,2,0.0' (ranks joined by '.'). Empty: "
        "a chain of gamma tokens. 'dyn:N:D:K': a dynamic tree per greedy row and block (EAGLE-2): "
        "D draft calls, the K most confident nodes expanded per call, the N most probable "
        "paths verified; sampled rows in the block use a layout fixed in advance.",
    )  # parsed once into ``tree_shape``
    lookup: int = knob(
        0,
        f"Prompt lookup (0..{MAX_GAMMA}; 0 off): in a block where every row's last n tokens "
        "appeared earlier in its prompt or output, the target verifies up to this many tokens "
        "that followed them there, in place of the draft's block (no draft call; works "
        "without a draft too). Lossless: greedy output stays the target's (token for token in "
        "float32; bf16 near-ties may flip, as for any SD); a sampled row accepts a copied "
        "token with the target's probability of it.",
    )
    lookup_ngram: int = knob(
        DEFAULT_LOOKUP_NGRAM,
        f"Prompt lookup: the shortest suffix n that counts as a match, in 1..{MAX_LOOKUP_NGRAM} "
        "(longer suffixes, up to 4, are tried first).",
    )

    def __post_init__(self) -> None:
        if not _is_int(self.gamma) or not 1 <= self.gamma <= MAX_GAMMA:
            raise ValueError(
                f"gamma must be an integer >= 1 and <= {MAX_GAMMA}, got {self.gamma!r}. It is "
                "the number of draft tokens checked per target call; 3 to 8 is typical."
            )
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ValueError(
                f"confidence_threshold must be in [0, 1), got {self.confidence_threshold}. "
                "0 disables adaptive drafting; 0.3 to 0.6 is typical."
            )
        self._parse_tree()
        if not _is_int(self.lookup) or not 0 <= self.lookup <= MAX_GAMMA:
            raise ValueError(
                f"lookup must be an integer in [0, {MAX_GAMMA}], got {self.lookup!r}: the most "
                "tokens copied from the context per target call. 0 turns prompt lookup off; "
                "4 to 8 is typical."
            )
        if not _is_int(self.lookup_ngram) or not 1 <= self.lookup_ngram <= MAX_LOOKUP_NGRAM:
            raise ValueError(
                f"lookup_ngram must be an integer in [1, {MAX_LOOKUP_NGRAM}], got "
                f"{self.lookup_ngram!r}: the shortest repeated suffix that counts as a match. "
                "2 is typical; 1 matches on any repeated token."
            )
        if self.lookup_ngram != DEFAULT_LOOKUP_NGRAM and not self.lookup:
            raise ValueError(
                f"lookup_ngram {self.lookup_ngram} shapes prompt lookup, which is off (lookup "
                "0): set lookup > 0 (e.g. 8) or drop lookup_ngram."
            )
        if self.lenience not in LENIENCE_CHOICES:
            raise ValueError(
                f"lenience must be one of {', '.join(LENIENCE_CHOICES)}, got {self.lenience!r}."
            )
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(
                f"epsilon must be in (0, 1], got {self.epsilon}. 1 is lossless; smaller values "
                "accept more draft tokens at some cost in quality."
            )

    def _parse_tree(self) -> None:
        """Parse ``tree`` once, here (a clear error before any model loads): ``tree_shape`` is
        the typed value everything downstream uses; ``tree`` stays its text (CLI, YAML, saved
        configs). A parsed ``Tree`` may be passed as ``tree`` too: it is taken as it is."""
        tree = self.tree
        if isinstance(tree, (Tree, DynamicTree)):
            object.__setattr__(self, "tree", tree.spec)
        elif isinstance(tree, str):
            tree = Tree.parse(tree) if tree.strip() else None  # "": a chain
        else:
            raise ValueError(f"tree must be a string such as '12' or '0,1,0.0', got {tree!r}.")
        object.__setattr__(self, "_tree_shape", tree)

    @property
    def tree_shape(self) -> Tree | DynamicTree | None:
        """The parsed tree (None: a chain of gamma tokens)."""
        return self._tree_shape

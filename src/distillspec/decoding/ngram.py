"""Prompt lookup proposals, pure parts: the continuation of the latest earlier occurrence of a
row's last n tokens in its own context (prompt + output).

Prompt lookup decoding (A. Saxena, 2023; vLLM's ``ngram`` speculator): where a text repeats
itself or copies from its prompt (code, quotes, lists, a small model's loops), the tokens that
followed the last n tokens the previous time they appeared are a free draft. The target checks
them like any draft tokens, so the output is the target's (greedy: argmax equality,
``acceptance.verify_greedy``; token for token in float32, bf16 near-ties aside).

``NgramIndex`` keeps, per n, the end of the latest occurrence of every n-gram of the context, so
a lookup costs O(n) and indexing O(new tokens x n) host work, not a scan of the context.
"""

from __future__ import annotations

from collections.abc import Sequence

LONGEST_NGRAM = 4  # matches are tried from this length down to the shortest allowed


class NgramIndex:
    """The latest occurrence of each n-gram (``shortest`` <= n <= max(shortest, 4)) of a growing
    token sequence.

    ``propose(tokens, count)``: ``tokens`` is the whole context so far (the previous call's
    tokens plus new ones at the end). Returns the ``count`` tokens that followed the latest
    earlier occurrence of its longest matching suffix (longest n first), or [] if none of its
    last n tokens appeared before for any allowed n."""

    def __init__(self, shortest: int = 2):
        if isinstance(shortest, bool) or not isinstance(shortest, int) or shortest < 1:
            raise ValueError(f"The shortest n-gram must be an integer >= 1, got {shortest!r}.")
        self.lengths = range(max(shortest, LONGEST_NGRAM), shortest - 1, -1)
        self.latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.lengths}
        self.indexed = 0  # n-grams ending at positions < indexed are in ``latest``

    def _index(self, tokens: Sequence[int], upto: int) -> None:
        """Record the n-grams ending at positions [indexed, upto) (later ones overwrite)."""
        for end in range(self.indexed, upto):
            for n in self.lengths:
                if end + 1 >= n:
                    self.latest[n][tuple(tokens[end + 1 - n : end + 1])] = end
        self.indexed = max(self.indexed, upto)

    def propose(self, tokens: Sequence[int], count: int) -> list[int]:
        length = len(tokens)
        if length < self.indexed:
            raise ValueError(
                f"NgramIndex saw {self.indexed} tokens before and now {length}: a context only "
                "grows. Use a new index for a new sequence."
            )
        # Every n-gram ending before the last position: the suffix itself is never its own match.
        self._index(tokens, length - 1)
        if count <= 0:
            return []
        for n in self.lengths:
            if length < n:
                continue
            end = self.latest[n].get(tuple(tokens[length - n :]))
            if end is not None:
                return list(tokens[end + 1 : end + 1 + count])
        return []

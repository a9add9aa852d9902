"""A model with its KV cache, for batched decoding where rows join, roll back and leave.

The cache (``SlotCache``) preallocates per layer ``keys/values [row capacity, heads, slot
capacity, head dim]`` and keeps a host-side write pointer ``length``: a forward writes slots
``[start, start + W)`` of the rows in the call and returns views of slots ``[0, start + W)``, so
nothing is reallocated or concatenated per step. Rows carry a per-row *slot mask* (which slots
hold a real token) and a host-side count of their tokens (their next RoPE position), so:

* **rollback** marks a row's rejected trailing slots invalid and moves the pointer back by the
  number every row rejected (at batch 1 this is exactly "forget the rejected tokens");
* **rows join** between steps: a new row's prompt is written right-aligned to end at the pointer
  (the slots before it stay invalid), so the rows already running are not touched;
* **rows leave**: live rows from the end move into the freed places (only they are copied);
* **compaction**: when masked holes dominate, every row's valid slots are gathered to the left
  (the host decides when, from its token counts: no device sync).

Attention never sees an invalid slot: ``CachedModel`` builds the 4-D mask itself (valid slot,
causal, each query also sees itself so padding queries are never all-masked).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from distillspec.decoding.attention import gqa_attention
from distillspec.decoding.packed_linear import packed_linears, refresh
from distillspec.decoding.ragged import RaggedCall, layout, packed_slots, ragged, supports


def ensure_croppable(model: PreTrainedModel) -> None:
    """Fail early for models whose cache cannot be rolled back (sliding-window, recurrent...)."""
    cache = DynamicCache(config=model.config)
    if not getattr(cache, "is_croppable", True) or any(getattr(cache, "is_sliding", [])):
        raise ValueError(
            f"{type(model).__name__} uses sliding-window or recurrent layers, whose cache cannot "
            "be rolled back, so rejected draft tokens cannot be forgotten. Use a model with full "
            "attention layers for speculative decoding."
        )


SLOT_BUCKET = 256  # compiled steps: capacity and key window grow in these steps (a graph each)
MAX_COMPILED_WIDTH = 16  # wider calls (prefills) stay eager: one graph per prompt length won't pay
MAX_GRAPHS = 64  # torch's default recompile limit (8) is below rows x widths x windows


def takes_4d_mask(model: PreTrainedModel) -> bool:
    """sdpa or eager attention: our own 4-D mask, which compiled steps and trees need."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


def _bucket(slots: int) -> int:
    return -(-max(slots, 1) // SLOT_BUCKET) * SLOT_BUCKET


class _SlotLayer(CacheLayerMixin):
    """One layer's preallocated keys and values; the owning SlotCache says where to write."""

    is_croppable = True
    is_sliding = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, slots = self.owner.row_capacity, self.owner.slot_capacity
        # Zeros, not empty: masked slots are multiplied by 0 weights, and 0 * NaN would be NaN.
        self.keys = key_states.new_zeros(rows, key_states.shape[1], slots, key_states.shape[3])
        self.values = value_states.new_zeros(
            rows, value_states.shape[1], slots, value_states.shape[3]
        )
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        call = self.owner.ragged
        if call is not None:  # packed tokens [1, H_kv, N, D], each to its own (row, slot)
            self.keys[call.row_index, :, call.slot_index] = key_states[0].transpose(0, 1)
            self.values[call.row_index, :, call.slot_index] = value_states[0].transpose(0, 1)
            return self.keys[: call.rows, :, : call.end], self.values[: call.rows, :, : call.end]
        if self.owner.write_index is not None:
            # Static shapes (compiled steps): write at a tensor position, attend over the first
            # write_window slots (a multiple of SLOT_BUCKET); the mask hides every slot that
            # holds no token of the row.
            count, window = self.owner.write_count, self.owner.write_window
            keys, values = self.keys[:count, :, :window], self.values[:count, :, :window]
            keys.index_copy_(2, self.owner.write_index, key_states)
            values.index_copy_(2, self.owner.write_index, value_states)
            return keys, values
        rows, start = self.owner.write_rows, self.owner.write_start
        end = start + key_states.shape[2]
        self.keys[rows, :, start:end] = key_states
        self.values[rows, :, start:end] = value_states
        return self.keys[rows, :, :end], self.values[rows, :, :end]

    def resize(self, rows: int, slots: int) -> None:
        if not self.is_initialized:
            return
        old_rows, _, old_slots, _ = self.keys.shape
        keep_rows, keep_slots = min(rows, old_rows), min(slots, old_slots)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(rows, old.shape[1], slots, old.shape[3])
            new[:keep_rows, :, :keep_slots] = old[:keep_rows, :, :keep_slots]
            setattr(self, name, new)

    def copy_rows(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Rows ``source`` overwrite rows ``target`` (swap-remove of finished rows)."""
        for buffer in (self.keys, self.values):
            buffer[target] = buffer[source]

    def gather_slots(self, order: torch.Tensor) -> None:
        """Row b's slot j becomes its slot ``order[b, j]`` (compaction), for the first rows."""
        rows, slots = order.shape
        for buffer in (self.keys, self.values):
            index = order[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
            buffer[:rows, :, :slots] = buffer[:rows].gather(2, index)

    def gather_window(self, index: torch.Tensor, start: int) -> None:
        """Row b's slot ``start + j`` becomes its slot ``index[b, j]`` (end of a tree block)."""
        rows, width = index.shape
        for buffer in (self.keys, self.values):
            expanded = index[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
            buffer[:rows, :, start : start + width] = buffer[:rows].gather(2, expanded)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """A transformers ``Cache`` over ``_SlotLayer``s; ``CachedModel`` drives its write window."""

    def __init__(self, num_layers: int, row_capacity: int = 1, slot_capacity: int = 64):
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.row_capacity, self.slot_capacity = row_capacity, slot_capacity
        self.length = 0
        self.write_rows: slice = slice(0, 0)
        self.write_start = 0
        self.write_index: torch.Tensor | None = None  # set during a static-shape forward
        self.ragged: RaggedCall | None = None  # set during a ragged forward
        self.write_count = 0
        self.write_window = 0

    def reserve(self, rows: int, slots: int) -> None:
        """Grow the buffers (at least doubling) so ``rows`` x ``slots`` fit."""
        if rows <= self.row_capacity and slots <= self.slot_capacity:
            return
        if rows > self.row_capacity:
            self.row_capacity = max(rows, 2 * self.row_capacity)
        if slots > self.slot_capacity:
            self.slot_capacity = max(slots, 2 * self.slot_capacity)
        for layer in self.layers:
            layer.resize(self.row_capacity, self.slot_capacity)


@dataclass(frozen=True)
class TreeCall:
    """A forward over tree nodes: their position offsets from the row's next position, and
    which of the slots ``[start, end of this call)`` each of them may see. One tree for every
    row (a tuple of offsets, ``visible [width, end - start]``) or one per row (a dynamic tree:
    offsets ``[rows, width]``, ``visible [rows, width, end - start]``)."""

    start: int
    offsets: tuple[int, ...] | torch.Tensor
    visible: torch.Tensor  # [width, end - start] or [rows, width, end - start] bool
    last_position: int | None = None  # positions are clamped here (the model's context - 1)


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward's name for the cache: ``cache`` from transformers 5.24 on (which still takes
    ``past_key_values``, with a deprecation warning), ``past_key_values`` before it (which
    silently ignores ``cache=``: every call would then attend to its own tokens only)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _logits(model, input_ids, attention_mask, position_ids, cache, logits_to_keep,
            keyword: str = "cache"):
    """The forward a compiled step runs (every argument that changes per step is a tensor)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=True, logits_to_keep=logits_to_keep, **{keyword: cache}).logits


_compiled_by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_steps(model: PreTrainedModel, enabled: bool = True) -> None:
    """Decoding steps of ``model`` (through any ``CachedModel``) run ``torch.compile``d.

    One compiled function per model, shared by all its caches, so a new Decoder reuses the
    graphs an earlier one compiled (one per rows x width x key window). Where to turn it on is
    a measured decision (``models.compilation``); this only says how.
    """
    if not enabled:
        _compiled_by_model.pop(model, None)
    elif model not in _compiled_by_model:
        if not takes_4d_mask(model):
            raise ValueError(
                f"Compiled steps need sdpa or eager attention; this model uses "
                f"{model.config._attn_implementation!r}. Use --compile off."
            )
        # torch's limit counts the graphs of `_logits` for all models together (and is global);
        # past it a call silently runs eager again: slower, never wrong.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   MAX_GRAPHS)
        _compiled_by_model[model] = torch.compile(_logits, dynamic=False)


def compile_failure(what: str, error: Exception) -> RuntimeError:
    """The error a failed ``torch.compile`` of ``what`` raises, with the way out."""
    return RuntimeError(
        f"Compiling {what} failed ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:200]}). torch.compile needs a working C++ compiler on "
        "CPU; run with --compile off."
    )


def steps_compiled(model: PreTrainedModel) -> bool:
    return model in _compiled_by_model


class CachedModel:
    """``model`` plus a SlotCache, the valid-slot mask and each row's token count (host).

    For a model marked by ``compile_steps``, decoding steps over all rows (not prefills) run
    ``torch.compile``d with static shapes: they write at a tensor position and attend over the
    slots up to the pointer rounded up to ``SLOT_BUCKET``, so a run needs one graph per
    (rows, width, window).
    """

    def __init__(self, model: PreTrainedModel, rows: int = 0, slots: int = 64):
        self.model = model
        refresh(model)  # the weights as they are now, whatever trained them since
        # Taken now: unmarking the model later leaves this cache's path as it started.
        self._compiled_forward = _compiled_by_model.get(model)
        self.compiled = self._compiled_forward is not None
        if self.compiled:
            slots = _bucket(slots)
        self.device = model.device
        self.cache = SlotCache(model.config.num_hidden_layers, max(rows, 1), slots)
        self.slot_mask = torch.zeros(max(rows, 1), slots, dtype=torch.bool, device=self.device)
        self.positions: list[int] = [0] * rows  # tokens cached per row = its next RoPE position
        self.embedding_rows = model.get_input_embeddings().weight.shape[0]
        self.attention_impl = getattr(model.config, "_attn_implementation", None)
        self.cache_keyword = cache_keyword(model)
        self.takes_ragged = supports(model)

    @property
    def rows(self) -> int:
        return len(self.positions)

    @property
    def kept_ids(self) -> torch.Tensor | None:
        """The token ids a pruned draft head scores (-inf elsewhere; a model whose logits pass a
        soft cap, tanh(x / cap) * cap, gives -cap there instead: still below every kept
        logit, so the argmax and top-k over these ids are the whole row's), or None: every id
        is scored, or the head returns its kept columns only (``kept_only``). Read at each
        call: a draft swapped or re-headed between steps is seen at once."""
        head = self.model.get_output_embeddings()
        ids = getattr(head, "token_ids", None)
        if not isinstance(ids, torch.Tensor) or getattr(head, "kept_only", False):
            return None
        return ids

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.inference_mode()
    def reserve(self, rows: int, slots: int) -> None:
        self.cache.reserve(rows, _bucket(slots) if self.compiled else slots)
        capacity = (self.cache.row_capacity, self.cache.slot_capacity)
        if tuple(self.slot_mask.shape) != capacity:
            grown = torch.zeros(capacity, dtype=torch.bool, device=self.device)
            r, s = min(capacity[0], self.slot_mask.shape[0]), min(capacity[1], self.slot_mask.shape[1])
            grown[:r, :s] = self.slot_mask[:r, :s]
            self.slot_mask = grown

    @torch.inference_mode()
    def add_rows(self, count: int) -> slice:
        """Room for ``count`` new, empty rows at the end; returns their row range."""
        start = self.rows
        self.reserve(start + count, self.length)
        self.slot_mask[start : start + count] = False
        self.positions += [0] * count
        return slice(start, start + count)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        pad_left: Sequence[int] | None = None,
        *,
        rows: slice | None = None,
        right_align: bool = False,
        logits_to_keep: int = 0,
        tree: TreeCall | None = None,
    ) -> torch.Tensor:
        """Write ``tokens [n, W]`` into ``rows`` (default: all) and return their logits.

        ``pad_left[i]`` leading columns of row i are padding (never attended, no position).
        Tokens go to slots ``[length, length + W)``; with ``right_align`` (new rows' prompts)
        they end at the pointer instead when they fit, leaving the running rows untouched.
        ``logits_to_keep`` > 0 computes the LM head for the last that many positions only.
        Ids beyond this model's embedding matrix (the other model's padding rows) are clamped:
        such a drafted token has target probability 0 and is always rejected, and a context
        token the draft cannot embed only changes q, which the rule accounts for.

        ``tree`` (a ``TreeCall``, every row, no padding): the tokens are tree nodes. Column i
        sits at position ``positions[row] + tree.offsets[i]`` and sees, among the slots from
        ``tree.start`` on, only those ``tree.visible[i]`` marks (its ancestors and itself);
        positions do not advance until ``keep_slots`` says which nodes stay. Room must have been
        made first (``make_room``): a tree's slots are never compacted away mid-block.
        """
        rows = rows if rows is not None else slice(0, self.rows)
        count, width = tokens.shape
        pad_left = list(pad_left) if pad_left is not None else [0] * count
        start = self._start(width, right_align)
        end = start + width
        if tree is not None:
            if end > self.cache.slot_capacity:
                raise RuntimeError("make_room before a tree block: the cache is full.")
            self.slot_mask[: self.rows, self.length : end] = False
        elif end > self.length:
            self._compact_if_needed(width)
            start = self._start(width, right_align)
            end = start + width
            self.reserve(self.rows, end)
            self.slot_mask[: self.rows, self.length : end] = False  # other rows: no token there
        valid, positions = self._columns(rows, pad_left, width, tree)
        self.slot_mask[rows, start:end] = valid
        self.cache.write_rows, self.cache.write_start = rows, start
        input_ids = tokens.clamp(max=self.embedding_rows - 1)
        static = (self.compiled and not right_align and rows == slice(0, self.rows)
                  and width <= MAX_COMPILED_WIDTH and self.cache.layers[0].is_initialized)
        with gqa_attention(self.model), packed_linears(self.model):
            if static:
                logits = self._static_forward(input_ids, positions, start, logits_to_keep, tree)
            else:
                mask = self._attention_mask(rows, start, width, tree=tree)
                logits = _logits(self.model, input_ids, mask, positions, self.cache,
                                 logits_to_keep, self.cache_keyword)
        self.cache.length = max(self.length, end)
        if tree is None:
            for offset, pad in enumerate(pad_left):
                self.positions[rows.start + offset] += width - pad
        return logits

    @torch.inference_mode()
    def forward_ragged(self, tokens: Sequence[Sequence[int]], keep: int = 1) -> torch.Tensor:
        """Write ``tokens[r]`` (one list per row, every row, at least ``keep`` tokens each)
        into row r in one ragged call (``decoding/ragged.py``) and return the logits of each
        row's last ``keep`` tokens, ``[rows, keep, V]`` (a verify block's, where the row's
        block follows a prompt it reads in the same call). Rows that hold context take exactly
        ``keep`` tokens (wider rows are new ones, reading their prompts). A row's tokens end at
        the call's last slot, as a padded call of the widest row would place them: ``keep``
        slots past the pointer, or further when a row is wider than that, leaving the other
        rows a hole. Eager, also on a compiled model. Only for models that ``takes_ragged``."""
        counts = [len(row) for row in tokens]
        if keep < 1 or len(counts) != self.rows or min(counts, default=0) < keep:
            raise ValueError(f"a ragged call needs {max(keep, 1)}+ tokens for each of the "
                             f"{self.rows} rows, got counts {counts}.")
        widest = max(counts)
        self._compact_if_needed(widest)
        end = max(self.length + keep, widest)
        self.reserve(self.rows, end)
        self.slot_mask[: self.rows, self.length : end] = False
        device = self.device
        slots = packed_slots(counts, end, device)
        self.slot_mask[slots] = True
        call, positions, last = layout(counts, end, self.positions, slots, self._attention_mask)
        if keep > 1:  # each row's last `keep` packed tokens, in order
            last = (last.unsqueeze(1) + torch.arange(1 - keep, 1, device=device)).reshape(-1)
        input_ids = torch.tensor([[t for row in tokens for t in row]], device=device)
        total = input_ids.shape[1]
        unused_mask = torch.ones(1, 1, total, end, dtype=torch.bool, device=device)
        self.cache.ragged = call
        try:
            with ragged(self.model, call), packed_linears(self.model):
                logits = _logits(self.model, input_ids.clamp(max=self.embedding_rows - 1),
                                 unused_mask, positions, self.cache, last, self.cache_keyword)
        finally:
            self.cache.ragged = None
        self.cache.length = end
        for row, count in enumerate(counts):
            self.positions[row] += count
        return logits[0].reshape(self.rows, keep, -1)

    def _columns(self, rows: slice, pad_left: list[int], width: int,
                 tree: TreeCall | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the ``width`` new columns hold a token (not left padding), and each one's
        position: the row's next position counted from its first real column, or the tree's
        offsets (clamped to ``tree.last_position``)."""
        pads = torch.tensor(pad_left, device=self.device)
        columns = torch.arange(width, device=self.device)
        valid = columns.unsqueeze(0) >= pads.unsqueeze(1)
        base = torch.tensor(self.positions[rows], device=self.device)
        if tree is not None:
            offsets = torch.as_tensor(tree.offsets, device=self.device)
            offsets = offsets if offsets.dim() == 2 else offsets.unsqueeze(0)
        else:
            offsets = (columns.unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)
        positions = base.unsqueeze(1) + offsets
        if tree is not None and tree.last_position is not None:
            positions = positions.clamp(max=tree.last_position)
        return valid, positions

    def make_room(self, width: int) -> None:
        """Compact if holes dominate and reserve ``width`` more slots (before a tree block)."""
        self._compact_if_needed(width)
        self.reserve(self.rows, self.length + width)

    @torch.inference_mode()
    def keep_slots(self, start: int, kept: Sequence[Sequence[int]]) -> None:
        """End a tree block: row b keeps the slots ``start + kept[b][i]`` (in that order) of the
        ones written since ``start``; they move to the front of that window, the rest are
        forgotten as a rollback forgets rejected slots, and the row's position advances by
        ``len(kept[b])``."""
        width = self.length - start
        if width <= 0:
            return
        orders = [list(k) + sorted(set(range(width)) - set(k)) for k in kept]
        if any(order != list(range(width)) for order in orders):
            index = torch.tensor(orders, device=self.device) + start
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.gather_window(index, start)
        counts = torch.tensor([len(k) for k in kept], device=self.device)
        window = torch.arange(width, device=self.device)
        self.slot_mask[: self.rows, start : self.length] = window.unsqueeze(0) < counts.unsqueeze(1)
        for row, k in enumerate(kept):
            self.positions[row] += len(k)
        self.cache.length -= width - max(len(k) for k in kept)

    def _static_forward(self, input_ids, positions, start: int, logits_to_keep: int, tree=None):
        """A compiled forward of every row: the write position is a tensor, keys are the slots
        up to the pointer rounded up to ``SLOT_BUCKET`` (the mask hides what no row holds), so
        the shapes repeat step after step. Not the whole capacity: a row with a long budget
        would make every step attend over slots nobody has written yet (16 rows at 1024 slots
        took 81.7 ms a step that way, 46.5 over the window: docs/results/serve-buckets)."""
        count, width = input_ids.shape
        window = min(_bucket(start + width), self.cache.slot_capacity)
        mask = self._attention_mask(slice(0, count), start, width, window=window, tree=tree)
        self.cache.write_index = torch.arange(start, start + width, device=self.device)
        self.cache.write_count, self.cache.write_window = count, window
        try:
            return self._compiled_forward(
                self.model, input_ids, mask, positions, self.cache, logits_to_keep,
                self.cache_keyword,
            )
        except torch._dynamo.exc.TorchDynamoException as error:
            raise compile_failure(f"the decoding step of {type(self.model).__name__}",
                                  error) from error
        finally:
            self.cache.write_index = None

    def _start(self, width: int, right_align: bool) -> int:
        """First slot to write: the pointer, or (new rows) ``width`` slots before it / slot 0."""
        if not right_align:
            return self.length
        return max(self.length - width, 0)

    def _attention_mask(self, rows: slice, start: int, width: int,
                        window: int | None = None, tree: TreeCall | None = None) -> torch.Tensor:
        """The 4-D mask for query slots ``[start, start + width)`` over key slots ``[0, end)``
        (``[0, window)`` for static shapes).

        Built here rather than by ``transformers`` from a 2-D mask: for one-token draft steps
        the library's mask construction costs more than the attention itself (~4 ms of a ~13 ms
        SmolLM2 4-layer step on CPU). Key j is visible to query i when it is a valid slot at or
        before the query. Each query also sees itself, so pad and dummy queries (whose outputs
        are never used) never have an all-masked row, which would produce NaN.
        """
        end = start + width
        slot_mask = self.slot_mask[rows, : window or end]
        if self.attention_impl not in ("sdpa", "eager"):  # the Decoder refuses trees here
            return slot_mask.long()  # e.g. flash-attention kernels take the 2-D padding mask
        query_slots = torch.arange(start, end, device=self.device)
        key_slots = torch.arange(window or end, device=self.device)
        causal = key_slots.unsqueeze(0) <= query_slots.unsqueeze(1)  # [W, S]
        causal = causal.unsqueeze(0)  # [1, W, S]
        if tree is not None:  # within the tree's slots a node sees its ancestors and itself
            tree_visible = tree.visible.to(self.device)
            causal = causal.expand(tree_visible.shape[0] if tree_visible.dim() == 3 else 1,
                                   -1, -1).clone()
            causal[:, :, tree.start : end] = tree_visible
        visible = causal & slot_mask.unsqueeze(1)  # [B, W, S]
        visible |= key_slots.unsqueeze(0) == query_slots.unsqueeze(1)
        visible = visible.unsqueeze(1)  # [B, 1, W, S]
        if self.attention_impl == "eager":  # eager adds the mask to the scores
            blocked = torch.finfo(self.model.dtype).min
            return torch.zeros(
                visible.shape, dtype=self.model.dtype, device=visible.device
            ).masked_fill(~visible, blocked)
        return visible

    @torch.inference_mode()
    def rollback(self, rejected: Sequence[int]) -> None:
        """Forget each row's last ``rejected[b]`` slots (all of them valid, written last)."""
        most, least = max(rejected, default=0), min(rejected, default=0)
        if most == 0:
            return
        first = self.length - most
        slot_index = torch.arange(first, self.length, device=self.device)
        cut = torch.tensor([self.length - r for r in rejected], device=self.device)
        self.slot_mask[: self.rows, first : self.length] &= slot_index.unsqueeze(0) < cut.unsqueeze(1)
        for row, count in enumerate(rejected):
            self.positions[row] -= count
        self.cache.length -= least  # slots every row rejected are free again

    @torch.inference_mode()
    def remove_rows(self, gone: Sequence[int]) -> list[int]:
        """Drop rows ``gone`` (e.g. finished sequences); returns the new order as old indices.

        Live rows from the end move into the freed places (swap-remove), so only as many rows
        are copied as left, never the whole cache.
        """
        gone = set(gone)
        count = self.rows - len(gone)
        holes = [i for i in sorted(gone) if i < count]  # freed places that must be refilled
        movers = [i for i in range(count, self.rows) if i not in gone]  # as many live rows
        order = list(range(count))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            source = torch.tensor(movers, device=self.device)
            target = torch.tensor(holes, device=self.device)
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.copy_rows(source, target)
            self.slot_mask[target] = self.slot_mask[source]
        self.positions = [self.positions[i] for i in order]
        if count == 0:
            self.cache.length = 0
        return order

    @torch.inference_mode()
    def _compact_if_needed(self, width: int) -> None:
        """Gather each row's valid slots to the left when holes would dominate the cache."""
        longest = max(self.positions, default=0)
        # Attention reads every slot up to the pointer: keep it within 1.5x the longest row.
        if self.length + width <= self.cache.slot_capacity and self.length <= 1.5 * longest + 32:
            return
        if self.rows == 0:
            self.cache.length = 0
            return
        mask = self.slot_mask[: self.rows, : self.length]
        # Stable sort puts each row's valid slots first, in order.
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.gather_slots(order)
        counts = torch.tensor(self.positions, device=self.device)
        slots = torch.arange(self.slot_mask.shape[1], device=self.device)
        self.slot_mask[: self.rows] = slots.unsqueeze(0) < counts.unsqueeze(1)
        self.cache.length = longest

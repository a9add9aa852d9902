"""Where the training outputs y come from: small strategy objects with one ``sample_batch``.

DistillSpec trains the draft on ``(x, y)`` with x from the training set and y from a data policy
(paper §2 / GKD): ``fixed`` (dataset completions), ``teacher`` (sampled from the target),
``draft`` (on-policy: sampled from the current draft) or ``mixed`` (a seeded choice among those,
one per batch). Every policy returns a ``SequenceBatch`` built by ``build_batch``, whose masks come
from prompt and completion *lengths*, never from token identity (pad == eos, several stop ids,
no eos and an EOS inside a completion all just work).

Teacher data "generated once and cached" is ``datagen`` (write a JSONL file of target samples)
followed by ``FixedPolicy`` on that file: ``TeacherPolicy`` itself always generates.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from distillspec.config import SamplingConfig
from distillspec.datasets import PromptExample
from distillspec.engine import autoregressive_generate

POLICY_NAMES = ("fixed", "teacher", "draft", "mixed")


@dataclass
class SequenceBatch:
    """Prompt + completion rows for one teacher-forced forward pass of draft and target.

    Row b is ``[pads, prompt_b, completion_b, pads]``: prompts left-padded to the longest prompt
    ``P`` so every completion starts at column ``P``, completions right-padded.
    ``loss_mask [B, L]`` is aligned with the *logits*: ``loss_mask[b, j] = 1`` iff token ``j + 1``
    is a completion token of row b, i.e. the logits at ``j`` predict it (the last column is
    always 0). ``position_ids`` count real tokens from 0 (0 at pads).
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long, 1 on prompt and completion tokens
    position_ids: torch.Tensor  # [B, L] long
    loss_mask: torch.Tensor  # [B, L] float32

    @property
    def num_loss_tokens(self) -> int:
        """Completion tokens scored in this batch (the real count, after generation)."""
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            loss_mask=self.loss_mask.to(device),
        )


def build_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> SequenceBatch:
    """Lay out prompts (left-padded) and completions (right-padded); masks from lengths only.

    ``pad_id`` only fills masked slots, so any id the models can embed works (even the EOS id).
    Rows with an empty completion get no loss tokens.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
    if not prompts:
        raise ValueError("Cannot build an empty batch: pass at least one example.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(
            "Every prompt needs at least one token: the first completion token is predicted "
            "from the prompt's last position. Add a BOS token or some text."
        )
    prompt_width = max(len(p) for p in prompts)
    width = prompt_width + max(len(c) for c in completions)
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    loss_mask = torch.zeros(batch, width, dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        start, end = prompt_width - len(prompt), prompt_width + len(completion)
        input_ids[row, start:end] = torch.tensor([*prompt, *completion], dtype=torch.long)
        attention_mask[row, start:end] = 1
        # Logits at column j predict token j + 1: completion tokens sit at [P, end).
        loss_mask[row, prompt_width - 1 : end - 1] = 1.0
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0) * attention_mask
    return SequenceBatch(input_ids, attention_mask, position_ids, loss_mask)


class Policy(Protocol):
    """The one interface: turn a list of examples into a ``SequenceBatch``."""

    name: str

    def sample_batch(
        self,
        examples: list[PromptExample],
        *,
        target: torch.nn.Module,
        draft: torch.nn.Module,
        generator: torch.Generator,
    ) -> SequenceBatch: ...


class FixedPolicy:
    """y = the dataset's completions (or a ``datagen`` file's cached target samples)."""

    name = "fixed"

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def sample_batch(self, examples, *, target, draft, generator) -> SequenceBatch:
        for example in examples:
            if example.completion_ids is None:
                raise ValueError(
                    f"{example.source}: the fixed policy needs a completion for every example "
                    "and this one has none. Add one, or use the teacher or draft policy."
                )
        prompts = [e.prompt_ids for e in examples]
        return build_batch(prompts, [e.completion_ids for e in examples], self.pad_id)


class _SamplingPolicy:
    """Shared by teacher and draft: sample completions from one model with our engine."""

    name = ""

    def __init__(
        self,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        eos_token_id: int | Iterable[int] | None = None,
        pad_id: int = 0,
    ):
        SamplingConfig(temperature=temperature)  # validates
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.pad_id = pad_id

    def _sample_from(self, model, examples, generator) -> SequenceBatch:
        prompts = [e.prompt_ids for e in examples]
        completions = generate_completions(
            model,
            prompts,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_token_id,
            generator=generator,
            pad_id=self.pad_id,
        )
        return build_batch(prompts, completions, self.pad_id)


class TeacherPolicy(_SamplingPolicy):
    """y ~ target(· | x), sampled afresh for every batch (batched, KV-cached engine).

    Existing ``completion_ids`` are ignored. To sample once and reuse, run ``datagen`` and train
    with ``FixedPolicy`` on the file it writes.
    """

    name = "teacher"

    def sample_batch(self, examples, *, target, draft, generator) -> SequenceBatch:
        return self._sample_from(target, examples, generator)


class DraftPolicy(_SamplingPolicy):
    """On-policy: y ~ draft(· | x) from the draft's current weights (the paper's default).

    The draft is sampled in eval mode (no dropout) and each module's previous train/eval mode is
    restored afterwards. Pass the unwrapped module (e.g. ``accelerator.unwrap_model(draft)``, not
    a DDP wrapper): generation calls the model directly and must not trigger gradient syncs.
    """

    name = "draft"

    def sample_batch(self, examples, *, target, draft, generator) -> SequenceBatch:
        return self._sample_from(draft, examples, generator)


class MixedPolicy:
    """Pick ONE component per batch with probability = its fraction (GKD's lambda for draft).

    The choice uses its own ``random.Random(seed)``, independent of torch's RNG; save
    ``state_dict()`` in checkpoints so a resumed run continues the same sequence of picks.
    ``last_choice`` is the name of the most recent pick (for logging).
    """

    name = "mixed"

    def __init__(self, components: Sequence[tuple[Any, float]], seed: int):
        components = list(components)
        if not components:
            raise ValueError("A mixed policy needs at least one (policy, fraction) component.")
        fractions = [float(f) for _, f in components]
        if not all(f > 0.0 and f <= 1.0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            mix = ", ".join(f"{p.name}={f}" for p, f in components)
            raise ValueError(
                f"Mixed-policy fractions must each be > 0 and sum to 1, got {mix} "
                f"(sum {sum(fractions):.6g}). Drop zero components and rescale the rest."
            )
        self.components = components
        self.seed = seed
        self._rng = random.Random(seed)
        self.last_choice: str | None = None

    def choose(self) -> Any:
        """Draw the policy for the next batch and record its name in ``last_choice``."""
        u = self._rng.random()
        cumulative = 0.0
        chosen = self.components[-1][0]  # guards against float round-off at the top end
        for policy, fraction in self.components:
            cumulative += fraction
            if u < cumulative:
                chosen = policy
                break
        self.last_choice = chosen.name
        return chosen

    def sample_batch(self, examples, *, target, draft, generator) -> SequenceBatch:
        policy = self.choose()
        return policy.sample_batch(examples, target=target, draft=draft, generator=generator)

    def _mix(self) -> list[list[Any]]:
        return [[policy.name, float(fraction)] for policy, fraction in self.components]

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng_state": self._rng.getstate(),
            "mix": self._mix(),
            "last_choice": self.last_choice,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the RNG (accepts a JSON round trip, where tuples became lists)."""
        saved_mix = [list(item) for item in state["mix"]]
        if saved_mix != self._mix():
            raise ValueError(
                f"The checkpoint's mixed policy was {saved_mix}, this run's is {self._mix()}. "
                "Resume with the same mix, or start a fresh run."
            )
        version, internal, gauss_next = state["rng_state"]
        self._rng.setstate((version, tuple(internal), gauss_next))
        self.last_choice = state.get("last_choice")


def make_policy(
    name: str,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    eos_token_id: int | Iterable[int] | None = None,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    pad_id: int = 0,
) -> Any:
    """Build a policy by name; ``mix`` (e.g. ``{"draft": 0.5, "teacher": 0.5}``) is for "mixed"."""
    if name not in POLICY_NAMES:
        raise ValueError(f"Unknown data policy {name!r}; choose one of {', '.join(POLICY_NAMES)}.")
    sampling = dict(
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_id=pad_id,
    )
    if name != "mixed":
        if mix is not None:
            raise ValueError(
                f"mix={mix} is only used by the 'mixed' policy, not {name!r}. Use "
                "policy 'mixed' or drop the mix."
            )
        if name == "fixed":
            return FixedPolicy(pad_id=pad_id)
        return (TeacherPolicy if name == "teacher" else DraftPolicy)(**sampling)
    if not mix:
        raise ValueError(
            "The 'mixed' policy needs mix fractions, e.g. {'draft': 0.5, 'teacher': 0.5}."
        )
    bad = [key for key in mix if key not in POLICY_NAMES[:-1]]
    if bad:
        raise ValueError(
            f"Unknown policies {bad} in mix; components must be among "
            f"{', '.join(POLICY_NAMES[:-1])}."
        )
    components = [(make_policy(key, **sampling), fraction) for key, fraction in mix.items()]
    return MixedPolicy(components, seed=seed)


def generate_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None,
    generator: torch.Generator | None,
    pad_id: int = 0,
) -> list[list[int]]:
    """New tokens per prompt (EOS included when hit) from ``autoregressive_generate``.

    Prompts are left-padded on the model's device; the model runs in eval mode and every module's
    previous mode is restored afterwards. ``generator`` must live on the model's device.
    """
    input_ids, attention_mask = left_pad(prompts, pad_id, model.device)
    with _eval_mode(model):
        result = autoregressive_generate(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=eos_token_id,
            generator=generator,
        )
    return result.sequences


def datagen(
    target: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[PromptExample],
    out_path: str | Path,
    *,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    eos_token_id: int | Iterable[int] | None,
    generator: torch.Generator | None,
) -> int:
    """Sample a completion from the target for every example and write them as JSONL.

    Each line is ``{"prompt", "completion", "prompt_ids", "completion_ids"}`` (texts decoded with
    special tokens kept, for reading; the ids are what ``load_examples`` uses). Existing
    completions are replaced. The file appears atomically (temp file + ``os.replace``). Load it
    with ``max_completion_tokens >= max_new_tokens`` or completions are truncated. Returns the
    number of lines written.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not examples:
        raise ValueError("datagen got no examples; nothing to generate.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_writer(out_path) as handle:
        for start in range(0, len(examples), batch_size):
            prompts = [e.prompt_ids for e in examples[start : start + batch_size]]
            completions = generate_completions(
                target,
                prompts,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                generator=generator,
                pad_id=pad_id,
            )
            for prompt, completion in zip(prompts, completions):
                record = {
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "completion": tokenizer.decode(completion, skip_special_tokens=False),
                    "prompt_ids": list(prompt),
                    "completion_ids": list(completion),
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(examples)


# ---------------------------------------------------------------------------------------------


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token (and the batch one prompt).")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, then every module's own previous ``training`` flag back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _atomic_writer(path: Path) -> Iterator[Any]:
    """Write to a temp file beside ``path``, then ``os.replace`` it; no partial file on error."""
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp's 0600 would leak into the final file
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise

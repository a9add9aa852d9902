"""Where the training outputs y come from: small strategy objects with one ``sample_batch``.

DistillSpec trains the draft on ``(x, y)`` with x from the training set and y from a data policy
(paper §2 / GKD): ``fixed`` (dataset completions), ``teacher`` (sampled from the target),
``draft`` (on-policy: sampled from the current draft), ``mixed`` (a seeded choice among those,
one per batch) or ``warm`` (the target's cached answers for the first part of the budget, then
on-policy). Every policy returns a ``SequenceBatch`` built by ``batch.build_batch``.

Teacher data "generated once and cached" is ``datagen`` (write a JSONL file of target samples)
followed by ``FixedPolicy`` on that file: ``TeacherPolicy`` itself always generates.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch

from distillspec.decoding.params import SamplingConfig
from distillspec.training.batch import SequenceBatch, build_batch
from distillspec.training.datagen import generate_completions
from distillspec.training.datasets import PromptExample

POLICY_NAMES = ("fixed", "teacher", "draft", "mixed", "warm")
MIX_COMPONENTS = ("fixed", "teacher", "draft")


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

    def __init__(self, pad_id: int = 0, topk: dict | None = None):
        self.pad_id, self.topk = pad_id, topk  # topk: source -> the target's cached top-k

    def sample_batch(self, examples, *, target, draft, generator) -> SequenceBatch:
        for example in examples:
            if example.completion_ids is None:
                raise ValueError(
                    f"{example.source}: the fixed policy needs a completion for every example "
                    "and this one has none. Add one, or use the teacher or draft policy."
                )
        prompts = [e.prompt_ids for e in examples]
        topk = [self.topk[e.source] for e in examples] if self.topk else None
        return build_batch(prompts, [e.completion_ids for e in examples], self.pad_id, topk)

    def completions(self, examples) -> dict[str, list[int]]:
        """The fixed completion of every example (what a top-k cache scores)."""
        return {e.source: e.completion_ids for e in examples if e.completion_ids is not None}


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


class CachedTeacherPolicy:
    """y = the target's completion generated once per prompt before training (teacher_cache):
    the teacher policy without re-running the target every step."""

    name = "teacher"

    def __init__(self, completions: dict[str, list[int]], pad_id: int = 0, topk: dict | None = None):
        self.cached, self.pad_id, self.topk = completions, pad_id, topk

    def sample_batch(self, examples, *, target, draft, generator) -> SequenceBatch:
        prompts = [e.prompt_ids for e in examples]
        topk = [self.topk[e.source] for e in examples] if self.topk else None
        return build_batch(prompts, [self.cached[e.source] for e in examples], self.pad_id, topk)

    def completions(self, examples) -> dict[str, list[int]]:
        return dict(self.cached)


class _ChoosingPolicy:
    """A policy that picks one component policy per batch (``choose``) and samples from it."""

    def choose(self) -> Any:
        raise NotImplementedError

    def sample_batch(self, examples, *, target, draft, generator) -> SequenceBatch:
        policy = self.choose()
        return policy.sample_batch(examples, target=target, draft=draft, generator=generator)


class MixedPolicy(_ChoosingPolicy):
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

    def parts(self) -> list[Any]:
        """The component policies."""
        return [policy for policy, _ in self.components]

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


class WarmStartPolicy(_ChoosingPolicy):
    """A warm start: ``warm`` (the target's cached answers) for the first ``fraction`` of the
    run's budget, then ``then`` (on-policy draft samples) for the rest.

    Sampling from a cold draft mostly yields junk for the target to score; a short phase on the
    target's own answers first gives on-policy data a draft worth sampling from (DistillSpec §4,
    GKD). ``progress()`` is the fraction of the budget used before the coming step (steps done /
    max_steps or training time / max_minutes, whichever is larger: ``setup.budget_progress``),
    so the switch follows whatever bounds the run. It is one-way and saved in ``state_dict``: a
    resumed run makes the choice the original made at every step up to its checkpoint (with a
    step budget the choice is a function of the step anyway). ``last_choice`` names the
    component of the most recent batch (for logging).
    """

    name = "warm"

    def __init__(self, warm: Any, then: Any, fraction: float, progress: Callable[[], float]):
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(
                f"The warm-start fraction must lie in (0, 1), got {fraction}: 0 is the on-policy "
                "policy draft and 1 the cached answers alone (policy fixed)."
            )
        self.warm, self.then, self.fraction, self.progress = warm, then, float(fraction), progress
        self.switched = False
        self.warm_batches = 0
        self.last_choice: str | None = None

    def choose(self) -> Any:
        """The policy for the next batch: ``warm`` until the budget's fraction is used."""
        if not self.switched and self.progress() >= self.fraction:
            self.switched = True
        chosen = self.then if self.switched else self.warm
        self.warm_batches += chosen is self.warm
        self.last_choice = chosen.name
        return chosen

    def parts(self) -> list[Any]:
        return [self.warm, self.then]

    def _plan(self) -> list[Any]:
        return [self.warm.name, self.then.name, self.fraction]

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self._plan(), "switched": self.switched,
                "warm_batches": self.warm_batches, "last_choice": self.last_choice}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["plan"]) != self._plan():
            raise ValueError(
                f"The checkpoint's warm start was {state['plan']} (warm policy, then, fraction), "
                f"this run's is {self._plan()}. Resume with the same warm_fraction and data, or "
                "start a fresh run."
            )
        self.switched = bool(state["switched"])
        self.warm_batches = int(state["warm_batches"])
        self.last_choice = state.get("last_choice")


def cached_component(policy: Any) -> Any:
    """The policy that replays fixed completions (``FixedPolicy`` or ``CachedTeacherPolicy``),
    itself or inside a mixed or warm-start policy: where the target's cached top-k attaches
    (teacher_topk). None when no batch comes from fixed completions."""
    if hasattr(policy, "completions"):
        return policy
    for part in getattr(policy, "parts", list)():
        if hasattr(part, "completions"):
            return part
    return None


def make_policy(
    name: str,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    eos_token_id: int | Iterable[int] | None = None,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    pad_id: int = 0,
    teacher_completions: dict[str, list[int]] | None = None,
    warm_fraction: float | None = None,
    progress: Callable[[], float] | None = None,
) -> Any:
    """Build a policy by name; ``mix`` (e.g. ``{"draft": 0.5, "teacher": 0.5}``) is for "mixed",
    ``warm_fraction`` and ``progress`` (the budget fraction used) for "warm".

    With ``teacher_completions`` (source -> ids, see ``datagen.teacher_cache``) the teacher
    component replays them instead of sampling the target; a warm start's first phase replays
    them too, else the data's own (fixed) completions.
    """
    if name not in POLICY_NAMES:
        raise ValueError(f"Unknown data policy {name!r}; choose one of {', '.join(POLICY_NAMES)}.")
    if mix is not None and name != "mixed":
        raise ValueError(
            f"mix={mix} is only used by the 'mixed' policy, not {name!r}. Use "
            "policy 'mixed' or drop the mix."
        )
    sampling = dict(temperature=temperature, max_new_tokens=max_new_tokens,
                    eos_token_id=eos_token_id, pad_id=pad_id)
    if name == "fixed":
        return FixedPolicy(pad_id=pad_id)
    if name == "teacher" and teacher_completions is not None:
        return CachedTeacherPolicy(teacher_completions, pad_id)
    if name in ("teacher", "draft"):
        return (TeacherPolicy if name == "teacher" else DraftPolicy)(**sampling)
    if name == "warm":
        if warm_fraction is None or progress is None:
            raise ValueError("The 'warm' policy needs warm_fraction and a progress function.")
        first = "teacher" if teacher_completions is not None else "fixed"
        warm = make_policy(first, pad_id=pad_id, teacher_completions=teacher_completions)
        return WarmStartPolicy(warm, DraftPolicy(**sampling), warm_fraction, progress)
    if not mix:
        raise ValueError(
            "The 'mixed' policy needs mix fractions, e.g. {'draft': 0.5, 'teacher': 0.5}."
        )
    bad = [key for key in mix if key not in MIX_COMPONENTS]
    if bad:
        raise ValueError(
            f"Unknown policies {bad} in mix; components must be among "
            f"{', '.join(MIX_COMPONENTS)}."
        )
    cached = dict(teacher_completions=teacher_completions)
    components = [
        (make_policy(key, **sampling, **cached), fraction) for key, fraction in mix.items()
    ]
    return MixedPolicy(components, seed=seed)

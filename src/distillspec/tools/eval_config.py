"""``distillspec eval``'s config: task quality beside speed, for each decoding setup. No torch.

A decoding setup is one string (``EvalSetup.parse``):

* ``target``: the target alone (plain decoding, no draft);
* ``sd:G``: lossless speculative decoding with G draft tokens per target call;
* ``sd:G:OPTION[:OPTION]``: with ``lin=EPS``, ``sq=EPS`` or ``exp=EPS`` (lossy acceptance,
  DistillSpec's lenience f_lin / f_sq / f_exp at strength EPS in (0, 1]; sampled decoding only)
  and/or ``threshold=X`` (adaptive drafting);
* ``tree:SPEC``: tree drafting (generate's ``--tree``, e.g. ``tree:15:2``; explicit rank paths
  joined with ``/``, e.g. ``tree:0/1/0.0``); greedy rows take the draft's top-k, sampled rows
  draws without replacement checked with the lossless multi-draft rule;
* any of these followed by ``:lookup=K``: prompt lookup blocks (up to K tokens copied from the
  row's own context, verified like draft tokens at any temperature), e.g. ``tree:15:2:lookup=8``;
  ``target:lookup=K`` speculates by lookup alone, with no draft.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from distillspec.common.config import knob, require_at_least, require_at_most, section
from distillspec.common.runtime import RuntimeConfig
from distillspec.decoding.params import (
    LENIENCE_CHOICES,
    MAX_GAMMA,
    SamplingConfig,
    SpeculationConfig,
    check_seed,
)
from distillspec.decoding.tree import Tree
from distillspec.tools.sandbox import SandboxLimits
from distillspec.training.config import MAX_BATCH, MAX_TOKENS, target_knob

TASKS = ("code", "text")
DEFAULT_DATA = {"code": "builtin:humaneval:heldout", "text": "builtin:chat:heldout"}
DEFAULT_MAX_NEW_TOKENS = {"code": 384, "text": 64}
SETUP_GRAMMAR = (
    "target | sd:G[:lin=EPS|:sq=EPS|:exp=EPS][:threshold=X] | tree:SPEC, each optionally "
    "followed by :lookup=K (prompt lookup; target:lookup=K needs no draft) (e.g. "
    "target, sd:4, sd:4:exp=0.5, sd:3:threshold=0.4, tree:15:2, tree:15:2:lookup=8, "
    "target:lookup=8)"
)
LOOKUP_OPTION = ":lookup="


@dataclass(frozen=True)
class EvalSetup:
    """One decoding setup of the engine, parsed from its string (the module docstring)."""

    label: str
    speculation: SpeculationConfig | None  # None: the target alone
    compare: bool = False  # drafted by --compare-draft instead of --draft
    draftless: bool = False  # target:lookup=K: speculation by prompt lookup only

    @property
    def uses_draft(self) -> bool:
        return self.speculation is not None and not self.draftless

    @property
    def lossy(self) -> bool:
        return self.speculation is not None and self.speculation.lenience != "none"

    @classmethod
    def parse(cls, text: str) -> EvalSetup:
        def bad(why: str) -> ValueError:
            return ValueError(f"Decoding setup {text!r}: {why}. Write one of: {SETUP_GRAMMAR}.")

        base, option, lookup = text.rpartition(LOOKUP_OPTION)
        if option:
            if LOOKUP_OPTION in base:
                raise bad("give :lookup=K once")
            if not lookup.isdigit() or not base or int(lookup) < 1:
                raise bad(f"lookup needs a whole number of tokens >= 1 after {base!r}, e.g. "
                          ":lookup=8")
            setup = cls.parse(base)
            speculation = setup.speculation or SpeculationConfig()
            try:
                speculation = replace(speculation, lookup=int(lookup))
            except ValueError as error:
                raise bad(str(error).rstrip(".")) from None
            return cls(text, speculation, draftless=setup.speculation is None)
        kind, _, rest = text.partition(":")
        if kind == "target" and not rest:
            return cls(text, None)
        if kind == "tree":
            spec = rest  # Tree.parse reads "/" as ","
            try:
                tree = Tree.parse(spec)
            except ValueError as error:
                raise bad(str(error).rstrip(".")) from None
            if tree is None:
                raise bad("the tree is empty")
            return cls(text, SpeculationConfig(gamma=min(tree.depth, MAX_GAMMA), tree=tree))
        if kind != "sd":
            raise bad(f"unknown kind {kind!r}")
        gamma_text, *options = rest.split(":")
        if not gamma_text.isdigit():
            raise bad("sd needs its number of draft tokens, e.g. sd:4")
        values: dict = {"gamma": int(gamma_text)}
        for option in options:
            name, _, value = option.partition("=")
            if name not in (*LENIENCE_CHOICES[1:], "threshold") or not value:
                raise bad(f"unknown option {option!r}")
            try:
                number = float(value)
            except ValueError:
                raise bad(f"{name} needs a number, got {value!r}") from None
            if name == "threshold":
                values["confidence_threshold"] = number
            elif "lenience" in values:
                raise bad("give at most one lenience (lin, sq or exp)")
            else:
                values.update(lenience=name, epsilon=number)
        try:
            return cls(text, SpeculationConfig(**values))
        except ValueError as error:
            raise bad(str(error).rstrip(".")) from None


@dataclass(frozen=True)
class EvalConfig:
    """``distillspec eval``: task quality (pass@k on code; log-likelihood and agreement with the
    target's greedy answers on any text) beside speed, for each decoding setup."""

    task: str = knob(
        "code", "code: pass@k of completions run against their unit tests in a sandbox "
        "(HumanEval-style); text: metrics without a judge model only.", choices=TASKS,
    )
    target: str = target_knob()
    draft: str = knob(
        "auto", "Draft for the sd/tree setups: an HF folder, .gguf, builtin:NAME or "
        "target-layers:N; auto = the draft `distillspec demo` distilled for the target.",
    )
    compare_draft: str = knob(
        "", "A second draft (an HF folder, .gguf, builtin:NAME or target-layers:N; e.g. the "
        "draft as shipped beside the distilled --draft): every sd/tree setup also runs with it, "
        "in the same run and against the same target setup, labelled 'SETUP [compare]' (the "
        "two alternate which goes first, setup by setup). Empty: none.",
    )
    setups: list[str] = knob(
        ["target", "sd:4"], f"Decoding setups to measure, in order: {SETUP_GRAMMAR}.",
    )
    data: str | None = knob(
        None, "code: builtin:humaneval[:heldout|:train|:all] or a .jsonl(.gz) of HumanEval-style "
        "problems (task_id, prompt, test, entry_point); text: builtin:NAME[:heldout] or a JSONL "
        f"of prompt/messages lines. Default: {DEFAULT_DATA['code']} / {DEFAULT_DATA['text']}.",
    )
    num_prompts: int = knob(0, "Use the first N problems or prompts (0: all).")
    max_new_tokens: int | None = knob(
        None, "Token budget per answer (default: "
        f"{DEFAULT_MAX_NEW_TOKENS['code']} for code, {DEFAULT_MAX_NEW_TOKENS['text']} for text). "
        "Code answers also stop at the first new top-level statement.",
    )
    max_prompt_tokens: int = knob(512, "text: prompts are cut (from the left) to this many tokens.")
    samples: int = knob(
        1, "Answers per problem or prompt (> 1 needs --temperature > 0); each row has its own seed.")
    pass_k: list[int] = knob([1], "code: the k of pass@k (each <= --samples).")
    batch_size: int = knob(1, "Rows decoded together (1: the usual SD latency setting).")
    seed: int = knob(0, "Row i of the eval samples with seed + i (greedy ignores it).")
    warmup: bool = knob(True, "Decode a few tokens with each setup first, untimed.")
    quality_tolerance: float = knob(
        0.01, "Lenience choice (eval.md): the fastest lossy setup that is faster than lossless "
        "SD with the same draft and setting and whose quality is at most this far below its "
        "(code: pass@1, 0.01 = one point; text: the target's log-likelihood, nats per token). "
        "Chosen on this eval's rows: confirm it on other data.",
    )
    sampling: SamplingConfig = section(SamplingConfig, flat=True)
    timeout_s: float = knob(5.0, "code: wall-clock limit per program run (CPU limit: the same, "
                            "rounded up, per process).")
    memory_mb: int = knob(1024, "code: address-space limit per sandboxed process, in MiB.")
    max_processes: int = knob(16, "code: processes a sandboxed program may have.")
    workers: int = knob(2, "code: sandboxed programs run in parallel.")
    out: str = knob("runs/eval", "Output folder: eval.json, eval.md, samples.jsonl.")
    runtime: RuntimeConfig = section(RuntimeConfig, flat=True)

    def __post_init__(self) -> None:
        check_seed(self.seed)
        require_at_least(self, 0, "num_prompts", "quality_tolerance")
        require_at_least(self, 1, "samples", "batch_size", "workers", "max_prompt_tokens",
                         "max_processes")
        require_at_most(self, MAX_BATCH, "batch_size")
        require_at_most(self, 1000, "samples")
        require_at_most(self, 64, "workers")
        require_at_most(self, MAX_TOKENS, "max_prompt_tokens")
        if self.max_new_tokens is not None:
            require_at_least(self, 1, "max_new_tokens")
            require_at_most(self, MAX_TOKENS, "max_new_tokens")
        self.sandbox_limits()  # timeout_s, memory_mb and max_processes, checked there
        if self.sampling.greedy and self.samples > 1:
            raise ValueError(
                f"samples = {self.samples} at temperature 0 would repeat the same greedy answer. "
                "Use --samples 1, or sample with --temperature > 0 (e.g. 0.8).")
        if not self.pass_k or min(self.pass_k) < 1 or max(self.pass_k) > self.samples:
            raise ValueError(
                f"pass_k must list values in 1..samples ({self.samples}), got {self.pass_k}. "
                "Raise --samples to estimate a larger k.")
        setups = self.parsed_setups()
        if len({s.label for s in setups}) < len(setups):
            raise ValueError(f"setups lists a setup twice: {self.setups}.")
        for setup in setups:
            if setup.lossy and self.sampling.greedy:
                raise ValueError(
                    f"Setup {setup.label!r} is lossy, but at temperature 0 p and q are one-hot, "
                    "so lenience changes nothing (f(0) = 0): it would measure lossless SD under "
                    "another name. Use --temperature > 0 (e.g. 1.0) for lossy setups.")
        if self.draft == "none" and any(s.uses_draft for s in setups):
            raise ValueError(
                "--draft none, but these setups need a draft: "
                + ", ".join(s.label for s in setups if s.uses_draft)
                + ". Give --draft SPEC or use --setups target.")

    def parsed_setups(self) -> list[EvalSetup]:
        if not self.setups:
            raise ValueError(f"setups must list at least one setup: {SETUP_GRAMMAR}.")
        setups = [EvalSetup.parse(text) for text in self.setups]
        if not self.compare_draft:
            return setups
        if not any(setup.uses_draft for setup in setups):
            raise ValueError("compare_draft is set but no setup uses a draft: add an sd:G or "
                             "tree:SPEC setup, or drop --compare-draft.")
        # each compare setup beside its own, so that both see the same machine state, the
        # first of the two alternating so that neither is always the warmer one
        ordered, drafted = [], 0
        for setup in setups:
            if not setup.uses_draft:
                ordered.append(setup)
                continue
            pair = [setup, replace(setup, label=f"{setup.label} [compare]", compare=True)]
            ordered += pair if drafted % 2 == 0 else pair[::-1]
            drafted += 1
        return ordered

    def sandbox_limits(self) -> SandboxLimits:
        return SandboxLimits(self.timeout_s, self.memory_mb, self.max_processes)

    @property
    def data_spec(self) -> str:
        return self.data or DEFAULT_DATA[self.task]

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.task]

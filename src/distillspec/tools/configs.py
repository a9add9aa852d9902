"""The tools' configs: ``generate``, ``bench``, ``demo``, ``study``, ... No torch here (fast
``--help``).

The demo's distillation recipe is a ``DistillConfig`` section whose defaults are the demo's
overrides (``DEMO_RECIPE``): one declaration per knob, reachable as ``--distill.KNOB``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillspec.common.config import knob, require_at_least, require_at_most, section
from distillspec.common.runtime import RuntimeConfig, refuse_draft_quantize
from distillspec.decoding.mode_policy import PLAIN_MARGIN, POLICIES, check_margin
from distillspec.decoding.params import (
    COMPILE_CHOICES,
    MAX_GAMMA,
    MAX_TEMPERATURE,
    SamplingConfig,
    SpeculationConfig,
    check_seed,
)
from distillspec.decoding.tree import Tree
from distillspec.tools.study_grid import Cell, Grid, Layout, cell_recipe
from distillspec.training.config import MAX_BATCH, MAX_TOKENS, DistillConfig, target_knob

MAX_WORKERS = 256

EXAMPLE_PROMPT = "Write a short poem about the sea."


def measured_setting_knob() -> bool:
    """The one declaration of the knob that follows a draft's saved fastest setting."""
    return knob(
        True,
        "Use the gamma, threshold, tree and prompt lookup `distillspec demo` measured fastest "
        "for this draft, target and machine kind (generate at a temperature > 0: the one the "
        "demo timed sampled, where it did; off when --gamma, --confidence-threshold, --tree or "
        "--lookup is given).",
    )


def parse_trees(specs: list[str]) -> tuple[Tree, ...]:
    """A config's tree list (``--trees``), each spec parsed once; an empty entry is refused."""
    trees = tuple(Tree.parse(spec) for spec in specs)
    if any(tree is None for tree in trees):
        raise ValueError("trees must not hold an empty entry: the chains are --gammas.")
    return trees


def compile_knob(default: str = "auto", note: str = "") -> str:
    """The one declaration of ``--compile`` (generate, serve)."""
    return knob(
        default,
        "Compiled decoding steps (torch.compile, static shapes; the first steps of each shape "
        "compile): auto (only models `distillspec bench` measured faster compiled on this "
        "machine kind and dtype), on, or off." + note,
        choices=COMPILE_CHOICES,
    )


@dataclass(frozen=True)
class GenerateConfig:
    """``distillspec generate``: what to run on which prompts."""

    target: str = target_knob()
    draft: str = knob(
        "auto",
        "Draft: HF folder, .gguf file, target-layers:N (the target's first N layers), none "
        "(plain decoding) or auto (the draft `distillspec demo` distilled for this target, at "
        "the setting it measured fastest, unless it measured slower than the target alone on "
        "this machine kind; else plain decoding).",
    )
    prompt: str | None = knob(None, "A single prompt text (default: an example prompt).")
    prompts: str | None = knob(
        None, 'A JSONL file with one {"prompt": ...} or {"messages": [...]} object per line.'
    )
    chat: bool | None = knob(
        None, "Render prompts with the tokenizer's chat template (default: when it has one)."
    )
    max_new_tokens: int = knob(64, "New tokens to generate per prompt.")
    batch_size: int = knob(1, "Prompts decoded together in one batch.")
    seed: int = knob(0, "Random seed for sampling (reproducible runs).")
    json: bool = knob(False, "Print one JSON object per prompt instead of text.")
    stream: bool = knob(False, "Print tokens as they are accepted (batch size 1).")
    measured_setting: bool = measured_setting_knob()
    compile: str = compile_knob()
    speculation: SpeculationConfig = section(SpeculationConfig, flat=True)
    sampling: SamplingConfig = section(SamplingConfig, flat=True)
    runtime: RuntimeConfig = section(RuntimeConfig, flat=True)

    def __post_init__(self) -> None:
        check_seed(self.seed)
        require_at_least(self, 1, "max_new_tokens", "batch_size")
        require_at_most(self, MAX_TOKENS, "max_new_tokens")
        require_at_most(self, MAX_BATCH, "batch_size")
        if self.prompt is not None and self.prompts is not None:
            raise ValueError("Give at most one of --prompt TEXT or --prompts FILE.jsonl.")
        if self.stream and (self.json or self.batch_size != 1):
            raise ValueError("--stream prints one prompt at a time: use it with --batch-size 1 "
                             "and without --json.")


@dataclass(frozen=True)
class BenchConfig:
    """``distillspec bench``: our SD against transformers (plain and assisted) in one run."""

    target: str = target_knob()
    draft: str = knob(
        "target-layers:4", "Draft: HF folder, .gguf, builtin:NAME or target-layers:N."
    )
    prompts: str = knob(
        "builtin:chat:heldout", "Prompts: builtin:NAME[:heldout], JSONL (prompt or messages)."
    )
    num_prompts: int = knob(8, "Use the first N prompts.")
    max_prompt_tokens: int = knob(256, "Prompts are cut (from the left) to this many tokens.")
    gammas: list[int] = knob([1, 2, 4, 6], "Lookaheads to compare.")
    confidence_thresholds: list[float] = knob(
        [0.0], "Adaptive-drafting thresholds to compare at each gamma (0: fixed gamma)."
    )
    trees: list[str] = knob(
        [], "Draft trees to compare (generate's --tree, e.g. 4:1,15:2,dyn:16:5:4; join "
        "explicit rank paths with '/', e.g. 0/1/0.0), at every temperature (sampled rows: "
        "the multi-draft rule); none by default."
    )
    temperatures: list[float] = knob([0.0, 1.0], "Temperatures (0 = greedy).")
    batch_sizes: list[int] = knob([1, 4], "Batch sizes.")
    max_new_tokens: int = knob(48, "New tokens per prompt.")
    stop_at_eos: bool = knob(
        False, "Stop rows at EOS (off: every method generates exactly max_new_tokens)."
    )
    repeats: int = knob(3, "Timed repeats after one warm-up; the median is reported.")
    seed: int = knob(0, "Sampling seed.")
    out: str = knob("bench-results", "Output folder: bench.json, bench.md, bench.png.")
    resume: bool = knob(
        True, "bench.json is rewritten after every finished setting (temperature, batch; "
        "'complete': false until the last): rerunning the same command on the same machine "
        "keeps those a stopped run finished and measures the rest; --no-resume measures all "
        "again."
    )
    question_file: str | None = knob(
        None, "Spec-Bench question.jsonl to answer with our SD and the target alone (batch 1)."
    )
    compile: str = knob(
        "auto",
        "Compiled decoding steps: auto and on time every model's steps eager and compiled side "
        "by side first, record the verdicts for --compile auto elsewhere, and run the sweep "
        "compiled for models where compiling measured faster (on: compiled regardless); off "
        "skips the comparison.",
        choices=COMPILE_CHOICES,
    )
    runtime: RuntimeConfig = section(RuntimeConfig, flat=True)

    def __post_init__(self) -> None:
        check_seed(self.seed)
        require_at_least(self, 1, "num_prompts", "max_new_tokens", "repeats", "max_prompt_tokens")
        require_at_most(self, MAX_TOKENS, "max_new_tokens", "max_prompt_tokens")
        require_at_most(self, 100, "repeats")
        for name, values in (("gammas", self.gammas), ("batch_sizes", self.batch_sizes)):
            if not values or min(values) < 1:
                raise ValueError(f"{name} must list integers >= 1, got {values}.")
        if max(self.gammas) > MAX_GAMMA or max(self.batch_sizes) > MAX_BATCH:
            raise ValueError(f"gammas must be <= {MAX_GAMMA} and batch_sizes <= {MAX_BATCH}.")
        if not self.temperatures or min(self.temperatures) < 0:
            raise ValueError(f"temperatures must be >= 0, got {self.temperatures}.")
        if not self.confidence_thresholds or not all(
            0 <= t < 1 for t in self.confidence_thresholds
        ):
            raise ValueError("confidence_thresholds must lie in [0, 1).")
        object.__setattr__(self, "_tree_shapes", parse_trees(self.trees))

    @property
    def tree_shapes(self) -> tuple[Tree, ...]:
        """``trees``, parsed once (here) into typed trees."""
        return self._tree_shapes


DEMO_RECIPE = dict(
    data="builtin:chat",
    eval_data="builtin:chat:heldout",
    policy="fixed",
    teacher_topk=32,
    train_embeddings=False,
    lr=3e-3,
    max_steps=100_000,
    max_new_tokens=64,
    max_completion_tokens=64,
    # Steps run at 3-6 per second on a 2-core CPU: evaluating every 60 took 7 of the demo-v8
    # run's 19 wall minutes of training; every 200 keeps ~20 points on the alpha curve.
    eval_every=200,
    save_every=200,
    eval_prompts=12,
    eval_tau_prompts=0,
    eval_max_new_tokens=64,
    resume=True,
)


@dataclass(frozen=True)
class DemoConfig:
    """``distillspec demo``: measure a draft, distil it within a time budget, measure again."""

    minutes: float = knob(12.0, "Training budget in minutes (the distillation's max_minutes).")
    out: str = knob(
        "runs/demo", "Output folder: report.json, plots, the distilled draft (run/final)."
    )
    fresh: bool = knob(False, "Discard the previous demo run (only files the demo wrote).")
    prompt_pool: int = knob(
        1024,
        "Training prompts the target writes itself (Magpie), answered greedily by the target; "
        "both generated once and cached. 0: answer --distill.data's prompts instead.",
    )
    extra_prompts: str = knob(
        "builtin:chat-pool:all",
        "Written prompts the target also answers greedily (once, cached), trained on beside its "
        "own pool: written requests make the draft hold on written prompts (builtin:chat-pool, "
        "1361 requests apart from the evaluation set builtin:chat). none: the pool only.",
    )
    answer_samples: int = knob(
        1,
        "Answers the target also samples at T=1 for every training prompt (pool and "
        "--extra-prompts; once each, cached), trained on beside its greedy answers: contexts "
        "and targets of sampled decoding. 1 raised T=1 alpha by 0.02-0.05, greedy alpha level "
        "(docs/results/written-prompts-3, demo-v10); the first run generates ~14 min more on 2 "
        "CPU cores. 0: greedy answers only.",
    )
    draft: str = knob(
        "auto",
        "The draft to distil: auto (of --draft-layers layers with a --draft-vocab head, the one "
        "whose measured cost ratio c predicts the best speed-up at alpha 0.4), or a draft_init "
        "spec such as target-layers:4:vocab=8192. Replaces --distill.draft-init.",
    )
    draft_layers: list[int] = knob([2, 3, 4], "Layer counts auto chooses from.")
    draft_vocab: int = knob(8192, "Head size of auto's drafts (0: the full vocabulary).")
    speed_prompts: int = knob(
        12,
        "The choice split: held-out prompts (the first of --distill.eval-data) decoded at every "
        "setting to choose the fastest one, which the draft then saves.",
    )
    report_data: str = knob(
        "builtin:chat:train",
        "The report split: prompts neither trained on (the demo trains on the target's own "
        "prompts) nor chosen on, where the chosen setting's speed-up and alpha are reported.",
    )
    report_prompts: int = knob(16, "Prompts of --report-data used (the first ones).")
    report_repeats: int = knob(
        2, "Timed rounds on the report split (median); each runs the target alone once."
    )
    max_new_tokens: int = knob(64, "Tokens generated per held-out prompt when measuring.")
    gammas: list[int] = knob([1, 2, 3], "Lookaheads measured before and after.")
    confidence_thresholds: list[float] = knob(
        [0.0, 0.4], "Adaptive-drafting thresholds measured after distillation (0: fixed gamma)."
    )
    trees: list[str] = knob(
        ["3:1", "4:1", "15:2"],
        "Draft trees measured before and after (generate's --tree; commas separate the list, "
        "so join explicit rank paths with '/', e.g. 0/1/0.0); greedy. 3:1 verifies 4 tokens, "
        "the cheap width of float32 verify curves on AVX2 CPUs.",
    )
    repeats: int = knob(
        1, "Timed rounds on the choice split (median); each round runs the target alone once."
    )
    lookup: int = knob(
        8, "After distillation, every tree is also timed with prompt lookup blocks of up to this "
        "many tokens (generate's --lookup), greedy and at --sampled-temperature, on the choice "
        f"split, so the fastest setting may include it; 0 skips them. At most {MAX_GAMMA}.",
    )
    sampled_temperature: float = knob(
        1.0, "After the greedy choice, the fastest greedy chain and every tree (with and "
        "without --lookup) are timed again at this temperature on the choice split (trees: "
        "the multi-draft rule), the fastest "
        "reported on the report split and saved for generate at T > 0; 0 skips it."
    )
    distill: DistillConfig = section(
        DistillConfig, "The distillation recipe (demo defaults; --distill.KNOB). The demo sets "
        "its data, draft_init, max_minutes and output_dir.", **DEMO_RECIPE
    )

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}.")
        require_at_least(self, 1, "speed_prompts", "max_new_tokens", "repeats", "report_prompts",
                         "report_repeats")
        require_at_least(self, 0, "prompt_pool", "draft_vocab", "answer_samples", "lookup")
        require_at_most(self, MAX_GAMMA, "lookup")
        require_at_most(self, MAX_TOKENS, "max_new_tokens")
        require_at_most(self, 8, "answer_samples",
                        why="Each sample is a generation pass of the target over every prompt.")
        require_at_most(self, 100, "repeats", "speed_prompts", "report_repeats")
        require_at_most(self, 1000, "report_prompts")
        if not 0 <= self.sampled_temperature <= MAX_TEMPERATURE:
            raise ValueError(f"sampled_temperature must lie in [0, {MAX_TEMPERATURE:g}] (0 skips "
                             f"the sampled timing), got {self.sampled_temperature}.")
        require_at_most(self, 100_000, "prompt_pool")
        if not self.gammas or min(self.gammas) < 1 or max(self.gammas) > MAX_GAMMA:
            raise ValueError(f"gammas must lie in 1..{MAX_GAMMA}, got {self.gammas}.")
        if not self.draft_layers or min(self.draft_layers) < 1:
            raise ValueError(f"draft_layers must list layer counts >= 1, got {self.draft_layers}.")
        if not all(0 <= t < 1 for t in self.confidence_thresholds):
            raise ValueError("confidence_thresholds must lie in [0, 1).")
        object.__setattr__(self, "_tree_shapes", parse_trees(self.trees))

    @property
    def tree_shapes(self) -> tuple[Tree, ...]:
        """``trees``, parsed once (here) into typed trees."""
        return self._tree_shapes

    @property
    def runtime(self) -> RuntimeConfig:
        return self.distill.runtime


@dataclass(frozen=True)
class ExportConfig:
    """``distillspec export``: write a (distilled) draft for another engine."""

    model: str = knob("", "The draft: an HF folder (e.g. runs/demo/run/final), .gguf or builtin:NAME.")
    to: str = knob("hf", "Format: hf, gguf or vllm.", choices=("hf", "gguf", "vllm"))
    out: str = knob("", "Output folder (created; refused if it holds files that are not an export).")
    target: str | None = knob(
        None, "The target the draft serves (default: the draft's recipe, distill_config.yaml)."
    )
    precision: str = knob(
        "bfloat16", "hf/vllm weights: bfloat16, float16 or float32.",
        choices=("bfloat16", "float16", "float32"),
    )
    gguf_type: str = knob("f16", "gguf weights: f16, q8_0 or f32.", choices=("f16", "q8_0", "f32"))
    gamma: int | None = knob(
        None, "num_speculative_tokens in the model card's and printed vLLM / llama.cpp commands "
        "(default: the gamma `distillspec demo` measured fastest for this draft, else 4)."
    )
    runtime: RuntimeConfig = section(RuntimeConfig, flat=True)

    def __post_init__(self) -> None:
        if not self.model or not self.out:
            raise ValueError("export needs a model and --out.")
        refuse_draft_quantize(self.runtime, "export (it writes full-precision weights)")
        if self.gamma is not None:
            require_at_least(self, 1, "gamma")
            require_at_most(self, MAX_GAMMA, "gamma")


@dataclass(frozen=True)
class ServeConfig:
    """``distillspec serve``: an OpenAI-compatible server with speculative decoding."""

    target: str = target_knob()
    draft: str = knob(
        "auto", "Draft: a spec as for generate; auto = the demo's distilled draft where it "
        "measured faster than the target alone on this machine kind, else none."
    )
    host: str = knob("127.0.0.1", "Address to bind (loopback by default).")
    port: int = knob(8000, "Port (0: any free port).")
    api_key: str | None = knob(None, "Require 'Authorization: Bearer KEY' on every /v1 request.")
    model_name: str | None = knob(None, "The model id clients use (default: the target spec).")
    max_batch: int = knob(16, "Requests decoded together; more wait in a queue.")
    max_waiting: int = knob(
        256, "Accepted requests not yet decoding beyond which new ones get 503 with Retry-After.")
    drain_seconds: float = knob(
        10.0, "On SIGTERM/SIGINT: stop accepting, let in-flight requests finish for this many "
        "seconds, then cancel them and exit; a second signal exits at once.")
    chat_template: bool = knob(True, "Apply the tokenizer's chat template in /v1/chat/completions.")
    measured_setting: bool = measured_setting_knob()
    compile: str = compile_knob(
        "off", " Off by default here: every batch size the server runs is a new shape, whose "
        "first step would stall all requests while it compiles.")
    online_distill: str | None = knob(
        None, "Folder for online distillation: served traffic is buffered there, a separate "
        "trainer distils candidates, and a candidate replaces the draft when its alpha on "
        "held-back traffic beats the current draft's. Off (nothing kept) when unset."
    )
    buffer_size: int = knob(2000, "Most served prompts kept in the online-distillation buffer.")
    distill_every: int = knob(64, "Start a distillation round after this many new prompts.")
    distill_minutes: float = knob(2.0, "Training budget of each online round.")
    distill_threads: int = knob(1, "CPU threads of the trainer process (the server keeps the rest).")
    sd_policy: str = knob(
        "auto", "When the server speculates: auto (each step picks speculate as configured, a "
        "1-token chain or plain decoding, whichever has produced the most tokens/s at this "
        "batch size, measured per row as it serves, speculation handicapped by --sd-margin; a "
        "step in 32 re-measures another; where no drafting mode can beat plain by the margin, "
        "that batch size and wider ones settle on plain, re-measured 1 step in 256; rows with a "
        "seed "
        "and a temperature keep speculating as configured, so their seed reproduces) or always "
        "(every step as configured). Lossless either way. See /metrics "
        "distillspec_spec_decode_steps.",
        choices=POLICIES,
    )
    sd_margin: float = knob(
        PLAIN_MARGIN, "With --sd-policy auto: the share by which speculation must beat plain "
        "decoding per step (in tokens/s per row) to run. It pays for what no step's timer sees: "
        "rows ending out of step are replaced one by one, and switching back to the draft "
        "first catches it up. 0: the faster per step runs."
    )
    speculation: SpeculationConfig = section(SpeculationConfig, flat=True)
    runtime: RuntimeConfig = section(RuntimeConfig, flat=True)

    def __post_init__(self) -> None:
        require_at_least(self, 0, "port")
        require_at_most(self, 65535, "port")
        require_at_least(self, 1, "max_batch", "max_waiting", "buffer_size", "distill_every",
                         "distill_threads")
        require_at_most(self, MAX_BATCH, "max_batch")
        if not self.distill_minutes > 0:
            raise ValueError(f"distill_minutes must be > 0, got {self.distill_minutes}.")
        if not 0 <= self.drain_seconds <= 3600:
            raise ValueError(f"drain_seconds must be in [0, 3600], got {self.drain_seconds}.")
        check_margin(self.sd_margin, "sd_margin")
        if self.sd_policy != "auto" and self.sd_margin != PLAIN_MARGIN:
            raise ValueError(f"sd_margin {self.sd_margin} would be ignored: only --sd-policy auto "
                             f"weighs speculation against plain (this is {self.sd_policy}). Drop "
                             "--sd-margin, or use --sd-policy auto.")


@dataclass(frozen=True)
class BenchServeConfig:
    """``distillspec bench-serve``: throughput and latency of the server, with SD and without."""

    target: str = target_knob()
    draft: str = knob("auto", "Draft for the SD server (auto: the demo's distilled draft).")
    url: str | None = knob(
        None, "Drive this running server instead (one mode only); default: start a server "
        "without SD and one with SD on loopback, both running, and alternate between them."
    )
    prompts: str = knob("builtin:chat:heldout", "Prompts: builtin:NAME, or JSONL with prompt/messages.")
    num_requests: int = knob(32, "Requests per concurrency level.")
    concurrency: list[int] = knob([1, 4, 16], "Concurrent clients.")
    max_tokens: int = knob(48, "max_tokens of every request.")
    temperature: float = knob(
        0.0, "Temperature of every request (0: greedy; above 0 sampled, with no seed, so the "
        "server's --sd-policy decides every step)."
    )
    request_rate: float = knob(
        0.0, "0: closed loop (each of --concurrency clients sends its next request when its "
        "last ends). Above 0: open loop, requests arrive at this mean rate per second (Poisson, "
        "seeded by --seed, round r of every server offered one schedule), at most --concurrency "
        "in flight, the rest queued at the client and their wait counted in the latency."
    )
    seed: int = knob(0, "Seed of the open loop's arrival times (round r uses seed + r).")
    rounds: int = knob(
        2, "Timed rounds of every level; the servers take turns in alternating order (A B, "
        "then B A) and each figure is the median over rounds."
    )
    out: str = knob("bench-serve", "Output folder: bench-serve.json, .md, .png.")
    sd_policy: list[str] = knob(
        ["auto"], "--sd-policy of the SD server; several (auto,always): one SD server each, "
        "all taking turns."
    )
    sd_margin: list[float] = knob(
        [PLAIN_MARGIN], "--sd-margin of the SD servers with --sd-policy auto; several (0,0.1): "
        "one such server each, all taking turns."
    )
    measured_setting: bool = measured_setting_knob()
    speculation: SpeculationConfig = section(SpeculationConfig, flat=True)
    runtime: RuntimeConfig = section(RuntimeConfig, flat=True)

    def __post_init__(self) -> None:
        if not self.sd_policy or not set(self.sd_policy) <= set(POLICIES):
            raise ValueError(f"sd_policy must list policies among {', '.join(POLICIES)}; got "
                             f"{self.sd_policy}.")
        if self.url and (self.sd_policy != ["auto"] or self.sd_margin != [PLAIN_MARGIN]):
            raise ValueError("--sd-policy and --sd-margin choose the policy of the SD servers "
                             "bench-serve starts; with --url it drives a running server whose "
                             "policy is its own. Drop them, or drop --url.")
        if not self.sd_margin or len(set(self.sd_margin)) != len(self.sd_margin):
            raise ValueError(f"sd_margin must list distinct values, got {self.sd_margin}.")
        for margin in self.sd_margin:
            check_margin(margin, "sd_margin")
        if "auto" not in self.sd_policy and self.sd_margin != [PLAIN_MARGIN]:
            raise ValueError(f"sd_margin {self.sd_margin} would be ignored: it sets the SD servers "
                             "with --sd-policy auto, and none is started. Drop --sd-margin, or add "
                             "auto to --sd-policy.")
        if self.seed != 0 and not self.request_rate > 0:
            raise ValueError(f"seed {self.seed} would be ignored: it draws the open loop's arrival "
                             "times, and a closed loop (--request-rate 0) has none. Add "
                             "--request-rate R, or drop --seed.")
        if self.url:
            refuse_draft_quantize(self.runtime, "bench-serve --url (the running server's draft "
                                                "is its own)")
        require_at_least(self, 1, "num_requests", "max_tokens", "rounds")
        require_at_least(self, 0, "temperature", "request_rate")
        require_at_most(self, MAX_TEMPERATURE, "temperature", why="(the server's range)")
        require_at_most(self, 1000, "request_rate", why="(requests per second)")
        require_at_least(self, 0, "seed")
        require_at_most(self, 10_000, "num_requests")
        require_at_most(self, 100, "rounds")
        if not self.concurrency or min(self.concurrency) < 1 or max(self.concurrency) > 256:
            raise ValueError(f"concurrency must list values in 1..256, got {self.concurrency}.")
        if len(set(self.concurrency)) != len(self.concurrency):
            raise ValueError(f"concurrency lists a value twice ({self.concurrency}): each level "
                             "runs --rounds times already; give each value once.")


# The study's base recipe: the demo's (cached top-k on the target's answers, frozen embeddings,
# lr 3e-3, the draft the demo chose on a 2-core CPU), evaluated only at the start and the end of
# each cell, with a few prompts of real greedy SD for tau.
STUDY_RECIPE = dict(
    {key: DEMO_RECIPE[key] for key in (
        "policy",  # each cell sets its own; fixed lets the base recipe carry teacher_topk
        "teacher_topk", "train_embeddings", "lr", "max_new_tokens", "max_completion_tokens",
        "save_every", "eval_prompts", "eval_max_new_tokens")},
    draft_init="target-layers:2:vocab=8192",
    eval_every=0,
    keep_checkpoints=1,
    eval_tau_prompts=2,
)


@dataclass(frozen=True)
class StudyConfig:
    """``distillspec study``: divergence x data source x task x seed, each a short distillation
    at an equal budget, measured at greedy and sampled decoding."""

    tasks: list[str] = knob(
        ["chat=self:1024@builtin:chat:heldout@builtin:chat:train"],
        "Tasks, each NAME=TRAIN[@CHOICE[@REPORT]]: TRAIN the training prompts (builtin:NAME, a "
        "data file, or self:N = N prompts the target writes itself, Magpie); CHOICE the "
        "held-out prompts every cell is evaluated on and the winner chosen by (default for "
        "builtin:NAME: builtin:NAME:heldout); REPORT optional other held-out prompts every cell "
        "is also measured on, to report the winner on prompts that did not choose it. The "
        "default trains on 1024 self-written prompts, chooses on the held-out hand-written chat "
        "prompts and reports on the other hand-written ones.",
    )
    divergences: list[str] = knob(
        ["fkl", "rkl", "jsd:0.5", "tvd", "lk"],
        "Divergences, NAME[:VALUE]: fkl, rkl, jsd[:beta], tvd, lk[:forward-KL weight].",
    )
    data_sources: list[str] = knob(
        ["teacher-greedy", "teacher-t1", "onpolicy", "mixed:0.5", "warm:0.25"],
        "Where completions come from: teacher-greedy / teacher-t1 (the target's answers, "
        "generated once per task, greedy or at T=1), onpolicy (the draft's samples, scored "
        "live), mixed:L (a fraction L of on-policy batches, the rest cached answers: GKD's "
        "lambda), warm:F (cached answers for the first fraction F of the budget, then "
        "on-policy).",
    )
    seeds: list[int] = knob([0, 1], "Seeds: every (task, divergence, data source) runs once per seed.")
    minutes: float = knob(
        3.0, "Training budget of every cell in minutes (0: steps only); evaluation not included."
    )
    steps: int = knob(0, "Step budget of every cell (0: minutes only); with both, the first to end.")
    mix_answers: str = knob(
        "greedy", "The cached answers mixed:L and warm:F replay: greedy or t1.",
        choices=("greedy", "t1"),
    )
    gammas: list[int] = knob(
        [1, 2, 3, 4], "Lookaheads the predicted SD speed-up of each cell is maximised over."
    )
    report_prompts: int = knob(32, "Prompts of a task's REPORT split measured per cell.")
    keep_drafts: bool = knob(
        False,
        "Keep every cell's trained draft (cells/ID/final: 4 bytes per draft parameter each). "
        "Off: once every cell has finished, only the winners' drafts are kept.",
    )
    out: str = knob(
        "runs/study", "Output folder: study.json, study.md, heatmaps, winners/*.yaml, cells/."
    )
    fresh: bool = knob(
        False, "Discard an earlier study in --out (only what studies wrote there) and start over."
    )
    workers: int = knob(
        1,
        "Worker processes that run cells at the same time on this machine, each with its own "
        "copy of the target and 1/N of the CPU threads (--threads, else torch's default). A "
        "worker that dies has its cell rerun (from its last checkpoint) by a new worker.",
    )
    recipe: DistillConfig = section(
        DistillConfig, "The base recipe of every cell (--recipe.KNOB). The study sets each "
        "cell's divergence (and its option), policy, data, eval_data, seed, budget and "
        "output_dir.", **STUDY_RECIPE
    )

    def __post_init__(self) -> None:
        require_at_least(self, 0, "minutes", "steps")
        require_at_least(self, 1, "report_prompts", "workers")
        require_at_most(self, MAX_BATCH, "report_prompts")
        require_at_most(self, MAX_WORKERS, "workers")
        if not self.minutes and not self.steps:
            raise ValueError(
                "The study needs a budget per cell: --minutes M, --steps N, or both (the first "
                "to end stops a cell)."
            )
        for seed in self.seeds:
            check_seed(seed, "seeds")
        if not self.gammas or min(self.gammas) < 1 or max(self.gammas) > MAX_GAMMA:
            raise ValueError(f"gammas must lie in 1..{MAX_GAMMA}, got {self.gammas}.")
        grid = self.grid()
        recipe = self.recipe
        if grid.answer_sets and recipe.max_completion_tokens < recipe.max_new_tokens:
            raise ValueError(
                f"recipe.max_completion_tokens ({recipe.max_completion_tokens}) is below "
                f"recipe.max_new_tokens ({recipe.max_new_tokens}): the cached answers would be cut "
                "when loaded. Raise max_completion_tokens to at least max_new_tokens."
            )
        for cell in grid.cells:
            self.cell_recipe(cell)  # every cell's recipe is valid before anything runs

    def grid(self) -> Grid:
        """The grid strings parsed into tasks, divergences, data sources and cells."""
        return Grid.parse(self.tasks, self.divergences, self.data_sources, self.seeds,
                          self.mix_answers)

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.out).expanduser().resolve())

    def cell_recipe(self, cell: Cell, draft_init: str | None = None) -> DistillConfig:
        """The cell's DistillConfig (errors name the cell)."""
        try:
            return cell_recipe(self.recipe, cell, self.layout, minutes=self.minutes,
                               steps=self.steps, draft_init=draft_init)
        except ValueError as error:
            raise ValueError(f"Study cell {cell.id}: {error}") from None

    @property
    def runtime(self) -> RuntimeConfig:
        return self.recipe.runtime

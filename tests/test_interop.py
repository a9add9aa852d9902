"""Meeting users where their models live: the Hub cache, exports to hf / gguf / vllm, Spec-Bench."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from huggingface_hub import ModelCard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from distillspec import autoregressive_generate, speculative_generate
from distillspec.models.loading import load_model
from distillspec.tools.cli import main

BPE_VOCAB = 320


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with BPE_VOCAB tokens (the kind GGUF's gpt2 model stores)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog " * 20, "speculative decoding " * 30]
    backend.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    tokenizer = bpe_tokenizer()
    vocab = len(tokenizer)
    save_tiny(root / "target", layers=3, lm_scale=10.0, vocab_size=vocab, tokenizer=tokenizer)
    save_tiny(root / "draft", layers=1, seed=1, lm_scale=10.0, vocab_size=vocab, tokenizer=tokenizer)
    (root / "target" / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return root


def hub_cache(pair, tmp_path, monkeypatch) -> str:
    """The tiny target as ``acme/tiny-target`` in a private Hugging Face cache, network off."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--tiny-target" / "snapshots" / ("a" * 40)
    shutil.copytree(pair / "target", snapshot)
    (hub / "models--acme--tiny-target" / "refs").mkdir(parents=True)
    (hub / "models--acme--tiny-target" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return "acme/tiny-target"


def test_a_hub_id_loads_from_the_local_cache_with_the_network_off(pair, tmp_path, monkeypatch):
    model, tokenizer = load_model(hub_cache(pair, tmp_path, monkeypatch), device="cpu",
                                  dtype="float32")
    assert model.config.num_hidden_layers == 3 and len(tokenizer) == model.config.vocab_size
    with pytest.raises(ValueError, match="not in the Hugging Face cache.*--allow-download"):
        load_model("acme/not-cached", device="cpu")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        from distillspec.models.loading import resolve_model_path

        resolve_model_path("acme/not-cached", allow_download=True)


def lossless_with(target, draft) -> None:
    ids = torch.tensor([[5, 9, 13, 40, 77]])
    plain = autoregressive_generate(target, ids, max_new_tokens=12)
    result = speculative_generate(target, draft, ids, gamma=3, max_new_tokens=12)
    assert result.sequences == plain.sequences


def machine_paths(text: str) -> list[str]:
    """Absolute paths of this machine in ``text`` (temporary folders, the home folder)."""
    return re.findall(rf"(?:/tmp|/var/tmp|{re.escape(str(Path.home()))})(?:/[^\s'\"]*)?", text)


def exported_texts(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (out / "model").iterdir()
            if p.suffix in (".md", ".json", ".jinja", ".txt")}


def test_export_hf_writes_a_card_with_base_model_licence_and_usage(pair, tmp_path, capsys):
    out = tmp_path / "hf"
    args = ["export", str(pair / "draft"), "--to", "hf", "--out", str(out), "--target",
            str(pair / "target"), "--precision", "float16"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    card = ModelCard.load(out / "model" / "README.md")
    # A local target has no Hub id: base_model is left out rather than naming a folder.
    assert card.data.base_model is None and card.data.license == "mit"
    assert card.data.library_name == "transformers" and "distillspec" in card.data.tags
    for usage in ("assistant_model=draft", "--speculative-config", '"method": "draft_model"',
                  "-md ", '"num_speculative_tokens": 4', "--draft-max 4"):
        assert usage in card.text and usage in printed
    assert "from_pretrained('DRAFT')" in card.text and "vllm serve TARGET" in card.text
    assert str(out / "model") in printed  # the printed lines are for this machine
    for name, text in exported_texts(out).items():
        assert machine_paths(text) == [], name
    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    assert exported.dtype == torch.float16
    target, _ = load_model(pair / "target", device="cpu", dtype="float32")
    lossless_with(target, exported.float())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["export", str(pair / "draft"), "--to", "hf", "--out", str(mine), "--target",
                 str(pair / "target")]) == 2
    assert (mine / "notes.txt").read_text() == "keep"


def test_export_uses_the_gamma_measured_for_the_draft(pair, tmp_path, capsys):
    from distillspec.models.recommended import save_recommended

    draft = tmp_path / "measured-draft"
    shutil.copytree(pair / "draft", draft)
    save_recommended(draft, target=str(pair / "target"), gamma=2, confidence_threshold=0.4,
                     tree="15:2", device=torch.device("cpu"), dtype=torch.float32,
                     measured={"speedup": 1.3})
    out = tmp_path / "measured"
    assert main(["export", str(draft), "--to", "vllm", "--out", str(out), "--target",
                 str(pair / "target")]) == 0
    printed = capsys.readouterr().out
    card = (out / "model" / "README.md").read_text()
    for text in (card, printed):
        assert '"num_speculative_tokens": 2' in text and "--draft-max 2" in text
    assert "gamma 2, confidence threshold 0.4, tree `15:2`: 1.30x the target alone" in card
    assert json.loads((out / "export.json").read_text())["gamma"] == 2
    assert main(["export", str(draft), "--to", "hf", "--out", str(tmp_path / "given"),
                 "--target", str(pair / "target"), "--gamma", "3"]) == 0
    assert '"num_speculative_tokens": 3' in capsys.readouterr().out
    assert main(["export", str(draft), "--to", "hf", "--out", str(tmp_path / "bad"),
                 "--gamma", "0"]) == 2
    assert "gamma must be >= 1" in capsys.readouterr().err
    save_recommended(draft, target="builtin:smollm2-135m", gamma=2, confidence_threshold=0.4,
                     device=torch.device("cpu"), dtype=torch.float32, measured={})
    assert main(["export", str(draft), "--to", "hf", "--out", str(tmp_path / "other"),
                 "--target", str(pair / "target")]) == 0  # measured with another target
    assert '"num_speculative_tokens": 4' in capsys.readouterr().out


def gguf_strings(path: Path) -> dict[str, str]:
    """Every string-valued key of a GGUF file (arrays of strings joined by newlines)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    strings = {}
    for key, field in reader.fields.items():
        if field.types and field.types[-1] == gguf.GGUFValueType.STRING:
            strings[key] = "\n".join(bytes(field.parts[i]).decode("utf-8", "replace")
                                     for i in field.data)
    return strings


def test_export_names_a_hub_target_as_base_model_in_card_and_gguf(pair, tmp_path, capsys,
                                                                 monkeypatch):
    import gguf

    target = hub_cache(pair, tmp_path, monkeypatch)
    out = tmp_path / "hub-gguf"
    assert main(["export", str(pair / "draft"), "--to", "gguf", "--out", str(out), "--target",
                 target]) == 0
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.base_model == "acme/tiny-target" and "vllm serve acme/tiny-target" in card.text
    strings = gguf_strings(out / "draft.gguf")
    assert strings["general.name"] == "tiny-target DistillSpec draft"
    assert strings["general.base_model.0.organization"] == "acme"
    assert strings["general.base_model.0.repo_url"] == "https://huggingface.co/acme/tiny-target"
    assert strings["general.license"] == "mit"
    field = gguf.GGUFReader(str(out / "draft.gguf")).fields["general.quantization_version"]
    assert int(field.parts[field.data[0]][0]) == gguf.GGML_QUANT_VERSION
    for name, text in {**strings, **exported_texts(out)}.items():
        assert machine_paths(text) == [], name


@pytest.mark.parametrize("quantization,tolerance", [("f16", 0.05), ("q8_0", 0.5)])
def test_export_gguf_round_trips_through_transformers(pair, tmp_path, capsys, quantization,
                                                      tolerance):
    out = tmp_path / f"gguf-{quantization}"
    assert main(["export", str(pair / "draft"), "--to", "gguf", "--out", str(out), "--target",
                 str(pair / "target"), "--gguf-type", quantization]) == 0
    gguf_file = out / "draft.gguf"
    source = AutoModelForCausalLM.from_pretrained(pair / "draft").eval()
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(out), gguf_file="draft.gguf", dtype=torch.float32
    ).eval()
    tokens = torch.tensor([[3, 17, 60, 101, 250, 7]])
    with torch.no_grad():
        expected, actual = source(tokens).logits, reloaded(tokens).logits
    scale = expected.abs().max()
    assert (expected - actual).abs().max() <= tolerance * scale  # stated tolerance, relative
    strings = gguf_strings(gguf_file)
    assert strings["general.name"] == "DistillSpec draft" and "general.base_model.0.name" not in strings
    assert [k for k, v in strings.items() if machine_paths(v)] == []
    draft, tokenizer = load_model(gguf_file, device="cpu", dtype="float32")  # our loader too
    loaded = tokenizer.get_vocab()  # every token keeps its id (transformers may add a default)
    assert all(loaded.get(token) == index for token, index in bpe_tokenizer().get_vocab().items())
    target, _ = load_model(pair / "target", device="cpu", dtype="float32")
    lossless_with(target, draft)


def test_export_vllm_checks_what_vllm_reads(pair, tmp_path, capsys):
    out = tmp_path / "vllm"
    assert main(["export", str(pair / "draft"), "--to", "vllm", "--out", str(out), "--target",
                 str(pair / "target")]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["checks"]["vocab_size"] == len(bpe_tokenizer())
    assert "vllm serve" in capsys.readouterr().out
    other = tmp_path / "other-target"
    save_tiny(other, layers=1, vocab_size=len(bpe_tokenizer()) + 64, tokenizer=bpe_tokenizer())
    assert main(["export", str(pair / "draft"), "--to", "vllm", "--out", str(tmp_path / "bad"),
                 "--target", str(other)]) == 2
    assert "vocab_size" in capsys.readouterr().err


def spec_bench_speed(answers: list[dict], baseline: list[dict], count_tokens) -> dict:
    """Spec-Bench's own aggregation (evaluation/speed.py): per-answer tokens/s averaged, the
    accept lengths flattened and averaged, the speed-up as the ratio of the two means."""
    import numpy as np

    speeds, accept_lengths = [], []
    for answer in answers:
        choice = answer["choices"][0]
        speeds.append(sum(choice["new_tokens"]) / sum(choice["wall_time"]))
        accept_lengths.extend(choice["accept_lengths"])
    base_speeds = []
    for answer in baseline:
        choice = answer["choices"][0]
        tokens = sum(count_tokens(turn) for turn in choice["turns"])
        base_speeds.append(tokens / sum(choice["wall_time"]))
    return {"mean_accepted": float(np.mean(accept_lengths)),
            "speedup": float(np.array(speeds).mean() / np.array(base_speeds).mean())}


def test_spec_bench_aggregation_runs_on_our_answer_files(pair, tmp_path):
    from distillspec.common.config import from_dict
    from distillspec.tools.bench import bench_main
    from distillspec.tools.configs import BenchConfig

    (tmp_path / "q.jsonl").write_text("".join(
        json.dumps({"question_id": i, "category": "writing", "turns": [f"the fox {i}", "again"]})
        + "\n" for i in range(3)))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "the quick brown fox"}) + "\n")
    config = from_dict(BenchConfig, dict(
        target=str(pair / "target"), draft=str(pair / "draft"), prompts=str(tmp_path / "p.jsonl"),
        num_prompts=1, gammas=[2], temperatures=[0.0], batch_sizes=[1], max_new_tokens=6,
        repeats=1, out=str(tmp_path / "bench"), question_file=str(tmp_path / "q.jsonl"),
        compile="off", runtime={"device": "cpu", "dtype": "float32"}))
    bench_main(config, progress=lambda message: None)
    read = lambda name: [json.loads(l) for l in (tmp_path / "bench" / name).read_text().splitlines()]  # noqa: E731,E741
    tokenizer = bpe_tokenizer()
    result = spec_bench_speed(read("answers-sd.jsonl"), read("answers-baseline.jsonl"),
                              lambda text: len(tokenizer(text).input_ids))
    assert result["mean_accepted"] >= 1.0 and result["speedup"] > 0

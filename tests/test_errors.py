"""Bad input fails early with a ValueError that says what, why and what to do."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, tiny_model

from distillspec import autoregressive_generate, speculative_generate
from distillspec.decoding.params import SamplingConfig, SpeculationConfig


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=0), tiny_model("llama", seed=1)


def run(pair, input_ids=None, attention_mask=None, **kwargs):
    target, draft = pair
    if input_ids is None:
        input_ids, attention_mask = left_padded([4])
    options = dict(gamma=4, max_new_tokens=8)
    options.update(kwargs)
    return speculative_generate(target, draft, input_ids, attention_mask, **options)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(gamma=0), "gamma must be an integer >= 1"),
        (dict(gamma=2.5), "gamma must be an integer >= 1"),
        (dict(epsilon=0.0, lenience="exp"), "epsilon must be in (0, 1]"),
        (dict(epsilon=1.5, lenience="lin"), "epsilon must be in (0, 1]"),
        (dict(lenience="cubic"), "lenience must be one of"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0, temperature=1.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.2, temperature=1.0), "top_p must be in (0, 1]"),
        (dict(top_k=-1, temperature=1.0), "top_k must be >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    ],
)
def test_invalid_knobs(pair, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(pair, **kwargs)


def test_empty_prompt(pair):
    with pytest.raises(ValueError, match="Empty prompt"):
        run(pair, torch.zeros(1, 0, dtype=torch.long))
    input_ids, attention_mask = left_padded([3, 1])
    attention_mask[1] = 0
    with pytest.raises(ValueError, match="Empty prompt"):
        run(pair, input_ids, attention_mask)


def test_right_padding_is_refused(pair):
    input_ids, attention_mask = left_padded([3, 3])
    attention_mask[1, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        run(pair, input_ids, attention_mask)


def test_prompt_longer_than_context(pair):
    long_ids = torch.randint(4, 90, (1, 256))
    with pytest.raises(ValueError, match="longer than the context"):
        run(pair, long_ids)
    with pytest.raises(ValueError, match=r"Use max_new_tokens <= 56"):
        run(pair, long_ids[:, :200], max_new_tokens=100)
    with pytest.raises(ValueError, match="longer than the context"):
        autoregressive_generate(pair[0], long_ids, max_new_tokens=4)


def test_config_objects_validate_themselves():
    with pytest.raises(ValueError, match="gamma"):
        SpeculationConfig(gamma=-3)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def test_yaml_files_name_the_file_and_line_and_refuse_lists(tmp_path):
    from distillspec.common.io import read_yaml_mapping
    from distillspec.tools.cli import main

    bad = tmp_path / "distill_config.yaml"
    bad.write_text("target: builtin:smollm2-135m\nlr: [0.1\ndivergence: fkl\n")
    with pytest.raises(ValueError, match=r"distill_config.yaml:3:\d+: the recipe is not valid YAML"):
        read_yaml_mapping(bad, "recipe")
    listed = tmp_path / "list.yaml"
    listed.write_text("- lr: 0.1\n- divergence: fkl\n")
    with pytest.raises(ValueError, match="is a list, but it must be a mapping"):
        read_yaml_mapping(listed, "recipe")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just words\n")
    with pytest.raises(ValueError, match="a single str value"):
        read_yaml_mapping(scalar, "recipe")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml_mapping(tmp_path / "empty.yaml") == {}
    # Through the CLI: a clear message and exit status 2, no traceback.
    assert main(["distill", "--config", str(listed)]) == 2
    # A draft folder whose saved recipe is corrupt: export names the file and the line.
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "distill_config.yaml").write_text("target: [x\n")
    from distillspec.tools.export import _recipe

    with pytest.raises(ValueError, match=r"draft/distill_config.yaml:2:\d+"):
        _recipe(draft)

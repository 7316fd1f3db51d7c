"""The configuration matrix: defaults, matrix files, ids."""

from __future__ import annotations

import pytest

from lorabench.errors import ConfigError
from lorabench.matrix import BASELINE_ID, DEFAULT_CONFIGS, build_matrix, short_name


def test_default_matrix_covers_the_reference_configurations():
    ids = [c.id for c in DEFAULT_CONFIGS]
    assert ids[0] == BASELINE_ID
    assert {"full", "lora", "qlora_nf4", "qlora_fp4", "lora_int8"} <= set(ids)
    assert {f"qlora_nf4_r{r}" for r in (8, 16, 32, 64)} <= set(ids)
    nf4 = next(c for c in DEFAULT_CONFIGS if c.id == "qlora_nf4")
    assert nf4.double_quant and nf4.quant == "nf4"
    assert all("sweep" in c.markers for c in DEFAULT_CONFIGS if c.id.startswith("qlora_nf4_r"))


def test_single_model_and_dataset_ids_are_the_configuration_ids():
    m = build_matrix()
    assert m.ids() == [c.id for c in DEFAULT_CONFIGS]


def test_several_models_and_datasets_make_a_product_with_ids_naming_all_three():
    m = build_matrix(models=["tiny-llama", "Qwen/Qwen3-0.6B"], datasets=["digit-reverse", "data/my set.jsonl"])
    ids = m.ids()
    assert len(ids) == 4 * len(DEFAULT_CONFIGS) == len(set(ids))
    assert "Qwen3-0.6B-my_set-qlora_nf4" in ids
    assert "tiny-llama-digit-reverse-full" in ids


def test_matrix_file_defaults_and_configs(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("models: [tiny-gpt2]\ndefaults: {steps: 12}\nconfigs:\n  - {id: a, quant: nf4}\n  - {id: b, method: full}\n")
    m = build_matrix(matrix_file=f, overrides={"seq_len": 48})
    assert m.models == ("tiny-gpt2",)
    assert [(c.id, c.steps, c.seq_len) for c in m.configs] == [("a", 12, 48), ("b", 12, 48)]
    assert build_matrix(matrix_file=f, models=["tiny-neox"]).models == ("tiny-neox",)


def test_matrix_file_without_configs_keeps_the_default_matrix(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("defaults: {steps: 9}\n")
    assert [c.steps for c in build_matrix(matrix_file=f).configs] == [9] * len(DEFAULT_CONFIGS)


@pytest.mark.parametrize(
    "text, match",
    [
        ("configs: [{id: a}, {id: a}]", "'a' appears twice"),
        ("confgs: []", r"unknown key\(s\) \['confgs'\]"),
        ("configs: [{id: a, rank: 0}]", r"configs\[0\].*rank=0"),
        ("configs: [{id: a, quant: nf4, method: full}]", "quantized weights cannot be trained directly"),
        ("configs: [{rank: 8}]", "missing required field 'id'"),
        ("configs: [nf4]", r"configs\[0\]: expected a mapping"),
        ("configs: {id: a}", "non-empty list"),
        ("models: 3", "'models' must be a list"),
        ("configs: [{id: a}\n", "not valid YAML"),
        ("- just a list", "expected a mapping"),
    ],
)
def test_bad_matrix_files_name_file_key_and_value(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        build_matrix(matrix_file=f)
    assert str(f) in str(info.value)


def test_missing_matrix_file():
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        build_matrix(matrix_file="nope.yaml")


@pytest.mark.parametrize("spec, name", [("Qwen/Qwen3-0.6B", "Qwen3-0.6B"), ("/data/x.jsonl", "x"),
                                        ("tiny-llama", "tiny-llama"), ("./ckpt/", "ckpt")])
def test_short_names(spec, name):
    assert short_name(spec) == name

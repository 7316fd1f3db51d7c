"""The configuration matrix: defaults, matrix files, ids."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

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


def _readme_selection_examples() -> list[str]:
    """The -k expressions of the README's "Selecting cases" block."""
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("### Selecting cases", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("#")[0])[3] for line in block.splitlines() if line.startswith("pytest bench/ -k")]


# What each README example must select from --model tiny-llama --model tiny-qwen --dataset digit-reverse
# --dataset qa.jsonl: a test of (model, data set short name, configuration id) for fine-tuning cases.
SELECTIONS = {
    "config[qlora_nf4]": lambda m, d, c: c == "qlora_nf4",
    "sweep": lambda m, d, c: c.startswith("qlora_nf4_r"),
    "model[tiny-qwen]": lambda m, d, c: m == "tiny-qwen",
    "dataset[qa]": lambda m, d, c: d == "qa",
    "model[tiny-qwen] and config[qlora_nf4]": lambda m, d, c: m == "tiny-qwen" and c == "qlora_nf4",
    "config[qlora_nf4_r8] or config[qlora_nf4_r64]": lambda m, d, c: c in ("qlora_nf4_r8", "qlora_nf4_r64"),
}


def test_the_readme_lists_the_tested_selection_examples():
    assert _readme_selection_examples() == list(SELECTIONS)


def _collect_in_this_process(args: list[str]) -> tuple[int, str]:
    """``pytest ARGS`` run by ``pytest.main`` here, with its terminal output: pytest's own collection and
    ``-k``, without the torch and transformers imports that a new interpreter repeats (most of the time
    of a ``--co`` subprocess)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(args)
    return int(code), out.getvalue()


@pytest.mark.parametrize("expression", list(SELECTIONS))
def test_readme_selection_examples_select_exactly_their_cases(expression, tmp_path):
    """Each README example, collected for real (``--co -q``) on a two-model, two-data-set matrix."""
    import shutil

    root = Path(__file__).resolve().parent.parent
    data = tmp_path / "qa.jsonl"
    shutil.copy(root / "tests" / "data" / "add-qa.jsonl", data)
    models, datasets = ["tiny-llama", "tiny-qwen"], ["digit-reverse", str(data)]
    code, out = _collect_in_this_process(
        # importlib: bench/test_classify.py must not clash with tests/test_classify.py already imported here
        [str(root / "bench"), "--co", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", "--rootdir", str(root),
         "-k", expression,
         *[f"--model={m}" for m in models], *[f"--dataset={d}" for d in datasets]])
    assert code == 0, out[-3000:]
    selected = {line.split("::", 1)[1] for line in out.splitlines() if line.startswith("bench/")}
    matrix = build_matrix(models=models, datasets=datasets)
    expected = {f"test_finetune[{case_id}]" for case, case_id in zip(matrix.cases(), matrix.ids())
                if SELECTIONS[expression](case.model, short_name(case.dataset), case.config.id)}
    assert expected and selected == expected


def test_selection_words_close_each_name_on_both_sides():
    from lorabench.matrix import Case

    case = Case("Qwen/Qwen3-0.6B", "data/qa.jsonl", next(c for c in DEFAULT_CONFIGS if c.id == "qlora_nf4"))
    assert case.keywords() == {"config[qlora_nf4]", "model[Qwen3-0.6B]", "model[Qwen/Qwen3-0.6B]",
                               "dataset[qa]", "dataset[data/qa.jsonl]"}

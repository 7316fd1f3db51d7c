"""``python -m lorabench list``: every configuration with its fields and markers, fitting the terminal."""

from __future__ import annotations

from lorabench.commands.main import main
from lorabench.matrix import DEFAULT_CONFIGS, build_matrix
from lorabench.commands.listing import list_lines, split_fields


def test_the_built_in_list_names_every_configuration_with_its_markers(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    for config in DEFAULT_CONFIGS:
        row = next(line for line in lines if line.split()[:1] == [config.id])
        assert config.markers[0] in row  # the first marker sits on the id's line; the rest may fold below
    assert f"{len(DEFAULT_CONFIGS)} configuration(s) on tiny-llama x digit-reverse" in out
    assert "minilm_lora" in out  # the bench's other kinds of case, by id


def test_a_wide_terminal_gets_a_column_per_field_that_differs():
    lines = list_lines(build_matrix(), width=400)
    header = next(line for line in lines if line.startswith("id "))
    assert header.split() == ["id", *split_fields(list(DEFAULT_CONFIGS))[0], "markers"]
    nf4_r8 = next(line for line in lines if line.startswith("qlora_nf4_r8 "))
    assert nf4_r8.split()[1:] == ["lora", "nf4", "True", "8", "16", "1", "none",
                                  "lora", "qlora", "nf4", "quantized", "checkpointing", "sweep"]


def test_a_matrix_file_lists_its_configurations_and_what_they_share(tmp_path, capsys):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("models: [tiny-gpt2]\ndefaults:\n  steps: 30\nconfigs:\n"
                      "  - id: a\n    rank: 8\n  - id: b\n    rank: 32\n    quant: nf4\n")
    assert main(["list", "--matrix", str(matrix), "--set", "lr=0.001"]) == 0
    out = capsys.readouterr().out
    assert "2 configuration(s) on tiny-gpt2 x digit-reverse: 2 fine-tuning case(s)" in out
    assert "steps=30" in out and "lr=0.001" in out  # shared fields, said once
    assert "qlora nf4" in out and "full" not in out.split("markers", 1)[1].split("other bench")[0]


def test_split_fields_keeps_only_the_differing_ones_as_columns():
    varying, common = split_fields(list(DEFAULT_CONFIGS))
    assert "rank" in varying and "quant" in varying
    assert "seed" in common and "seed" not in varying
    assert "id" not in varying and "tags" not in common


def test_a_bad_matrix_file_is_a_usage_error_naming_it(tmp_path, capsys):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("configs:\n  - id: a\n    rnak: 8\n")
    assert main(["list", "--matrix", str(matrix)]) == 2
    assert "m.yaml: configs[0]" in capsys.readouterr().err

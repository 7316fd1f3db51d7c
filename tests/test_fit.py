"""``python -m lorabench fit``: the table, the JSON record, the chart, the largest sizes, bad input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorabench.commands.main import main
from lorabench.config import BenchConfig
from lorabench.estimate import hf_config, predict
from lorabench.commands.fit import Budget, fit_case

ISSUE_KEYS = {"config": str, "gradient_checkpointing": bool, "batch_size": int, "seq_len": int,
              "predicted_peak_mib": float, "components_mib": dict, "fits": dict}


def test_fit_writes_the_table_the_json_record_and_the_chart(tmp_path, capsys):
    out = tmp_path / "reports"
    code = main(["fit", "--model", "tiny-llama", "--memory", "40MiB", "--memory", "1GiB", "--batch-size", "8",
                 "--seq-len", "16", "--set", "rank=8", "--json", str(tmp_path / "fit.json"), "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "tiny-llama: batch 8 x 16 tokens, cuda kernels" in text
    assert "fits 40MiB" in text and "fits 1GiB" in text
    data = json.loads((tmp_path / "fit.json").read_text())
    ids = [c["config"] for c in data["cases"]]
    assert ids == ["full", "lora", "qlora_nf4", "qlora_fp4", "lora_int8", "lora_torchao_int8"]  # the rank sweep left out
    for case in data["cases"]:
        for key, kind in ISSUE_KEYS.items():
            assert isinstance(case[key], kind), key
        assert (case["batch_size"], case["seq_len"]) == (8, 16)
        assert set(case["fits"]) == {"40MiB", "1GiB"}
        assert case["predicted_peak_mib"] == pytest.approx(sum(case["components_mib"].values()))
        assert case["fits"]["1GiB"] is (case["predicted_peak_mib"] <= 1024)
        assert case["fits"]["40MiB"] is (case["predicted_peak_mib"] <= 40)
        assert {"params", "grads", "optimizer", "activations", "temporaries", "cuda_context"} <= set(case["components_mib"])
        predicted = case["predicted"]
        assert {name: f["compare_with"] for name, f in predicted.items()} == {
            "tensor": "tensor_peak_mib", "allocated": "peak_alloc_mib", "reserved": "peak_reserved_mib",
            "device": "device_used_max_mib"}
        assert case["budget_figure"] == "device"
        assert case["predicted_peak_mib"] == predicted["device"]["mib"]
        context = case["components_mib"]["cuda_context"]
        assert predicted["device"]["mib"] == pytest.approx(predicted["reserved"]["mib"] + context)
        assert predicted["tensor"]["mib"] < predicted["allocated"]["mib"] <= predicted["reserved"]["mib"]
        assert "cuda_context" in case["assumed"] and "cublas_workspace" in case["assumed"]
    assert sorted(p.name for p in out.iterdir()) == ["fit-tiny-llama.png", "fit-tiny-llama.svg"]


def test_fit_without_a_budget_shows_the_predicted_figures_and_which_counter_each_compares_with(tmp_path, capsys):
    assert main(["fit", "--model", "tiny-llama", "--batch-size", "2", "--seq-len", "8", "--matrix",
                 str(_one_config(tmp_path)), "--out", str(tmp_path)]) == 0
    text = " ".join(capsys.readouterr().out.split())  # the notes fold to the terminal's width
    assert "fits" not in text
    for name, counter in (("tensor", "tensor_peak_mib"), ("allocated", "peak_alloc_mib"),
                          ("reserved", "peak_reserved_mib"), ("device", "device_used_max_mib")):
        assert f"{name}: compare with {counter}" in text
    assert "budgets are checked against it" in text


def _one_config(tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text("configs:\n  - {id: qlora, method: lora, quant: nf4, double_quant: true}\n")
    return path


def test_a_directory_with_only_config_json_is_a_model_for_fit(tmp_path, capsys):
    from lorabench.models.presets import raw

    model = tmp_path / "llama7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({k: v for k, v in raw("llama-2-7b").items()
                                                   if not k.startswith("_")}))
    assert main(["fit", "--model", str(model), "--memory", "24GiB", "--batch-size", "1", "--seq-len", "64",
                 "--matrix", str(_one_config(tmp_path)), "--json", str(tmp_path / "fit.json"),
                 "--out", str(tmp_path / "charts")]) == 0
    (case,) = json.loads((tmp_path / "fit.json").read_text())["cases"]
    assert case["fits"] == {"24GiB": True}
    assert 3.5 * 1024 < case["predicted"]["tensor"]["mib"] < 5 * 1024  # a 7B model in 4 bits, not a tiny one


def test_at_100_columns_no_line_of_fit_is_wider(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    # the longest configuration id and one case of each kind of base: the widest rows the table can have
    matrix = tmp_path / "m.yaml"
    matrix.write_text("configs:\n  - {id: full, method: full}\n  - {id: lora_torchao_int8, quant: torchao_int8}\n"
                      "  - {id: qlora_nf4, quant: nf4, double_quant: true}\n")
    assert main(["fit", "--model", "tiny-llama", "--memory", "600MiB", "--memory", "1GiB", "--batch-size", "8",
                 "--seq-len", "16", "--matrix", str(matrix), "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("fits 600MiB" in line for line in lines)
    assert max(len(line) for line in lines if not line.startswith("wrote ")) <= 100


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_the_largest_batch_that_fits_does_and_one_more_does_not(quant):
    config = BenchConfig("c", method="lora", quant=quant, double_quant=quant == "nf4")
    hf = hf_config("tiny-llama")
    budget = Budget("40MiB", 40.0)
    case = fit_case("tiny-llama", hf, config, [budget], batch_size=4, seq_len=16, target="cpu")
    largest = case.max_batch_size["40MiB"]
    assert largest > 4
    at = predict(hf, config, batch_size=largest, seq_len=16, target="cpu").peak_mib
    beyond = predict(hf, config, batch_size=largest + 1, seq_len=16, target="cpu").peak_mib
    assert at <= budget.mib < beyond


def test_the_searched_largest_sizes_are_a_linear_scan_of_uncached_predictions(monkeypatch):
    # the search runs on cached meta kernels (lorabench.estimate.step.MetaKernelCache); a scan from 1 runs
    # every kernel: a figure the cache changed would move the first size that does not fit
    from lorabench.estimate import Predictor, step

    config = BenchConfig("c", method="lora")
    hf = hf_config("tiny-llama")
    budget = Budget.parse("18.5MiB")  # on the CPU: tensor bytes, which grow with every row and token
    case = fit_case("tiny-llama", hf, config, [budget], batch_size=16, seq_len=16, target="cpu")
    monkeypatch.setattr(step, "CACHE_KERNELS", False)
    exact = Predictor(hf, config, target="cpu", extrapolate_layers=True)

    def scan(peak) -> int:
        n = 1
        while peak(n) <= budget.mib:
            n += 1
        return n - 1

    assert case.fits == {"18.5MiB": False}
    assert case.max_batch_size["18.5MiB"] == scan(lambda b: exact.predict(b, 16).peak_mib) >= 2
    assert case.max_seq_len["18.5MiB"] == scan(lambda t: exact.predict(16, t).peak_mib) >= 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--memory", "24XB"], "--memory '24XB': expected a size like 6GiB"),
    (["--memory", "24GiB", "--model", "preset:llama-9"], "no such preset; known:"),
    (["--memory", "24GiB", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--memory", "24GiB", "--set", "rank=zero"], "rank='zero' must be a whole number"),
])
def test_bad_input_is_named_and_exits_2(argv, message, capsys):
    if "--model" not in argv:
        argv = ["--model", "tiny-llama", *argv]
    assert main(["fit", *argv]) == 2
    assert message in capsys.readouterr().err


@given(largest=st.integers(-3, 3000), guess=st.integers(0, 4000), limit=st.none() | st.integers(1, 5000),
       slope=st.floats(0.1, 10.0), curve=st.floats(0.0, 0.01))
def test_settling_from_any_guess_finds_the_largest_size_that_fits(largest, guess, limit, slope, curve):
    from lorabench.commands.fit import _settle

    calls = []

    def peak(n: int) -> float:  # grows with n, nearly a line (a peak's activations, eager attention's square)
        calls.append(n)
        return slope * n + curve * n * n

    budget = peak(largest) if largest >= 1 else 0.5 * peak(1)
    calls.clear()
    found = _settle(peak, budget, guess, limit)
    if guess < 1:
        assert found == guess  # nothing to settle: the lines said nothing fits
    else:
        assert found == max(0, min(largest, limit or largest))
        assert len(calls) <= 2 * (abs(guess - found) + 2).bit_length() + 4  # a few predictions, not a scan

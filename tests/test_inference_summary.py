"""The summary's inference table and adapter lines."""

from __future__ import annotations

from lorabench.result import CaseResult
from lorabench.report.summary import adapter_lines, render_summary
from lorabench.report.tables import FILE_WIDTH


def _result(config_id: str, *, inference: bool = False, **metrics) -> CaseResult:
    r = CaseResult(case_id=config_id, config_id=config_id, model="tiny-llama", dataset="digit-reverse", device="cpu",
                   config={"kind": "inference"} if inference else {})
    for name, value in metrics.items():
        r.set(name, value)
    return r


def test_inference_variants_get_their_own_table_and_columns():
    results = [
        _result("lora", peak_rss_delta_mib=100.0, weights_mib=7.43, step_ms=110.0),
        _result("infer_base", inference=True, weights_mib=6.23, ttft_ms=100.0, decode_tokens_per_s=20.0,
                latency_ms=800.0, drift_cosine_mean=1.0),
        _result("infer_merged", inference=True, weights_mib=6.23, ttft_ms=100.0, decode_tokens_per_s=25.0,
                latency_ms=640.0, drift_cosine_mean=0.4, adapter_drift_cosine_mean=1.0),
    ]
    text = "\n".join(render_summary(results, width=FILE_WIDTH))  # one line per case, as in a file
    assert "tiny-llama on digit-reverse (cpu)," in text and "(cpu inference), baseline infer_base" in text
    inference_table = text.split("(cpu inference)")[1]
    assert "TTFT ms" in inference_table and "decode tok/s" in inference_table and "cos to adapter" in inference_table
    assert "step ms" not in inference_table
    assert "25.00 (+25.0%)" in inference_table  # decode rate against the base variant
    # one measurement each: the move is stated, and not called better
    assert "25.0% higher decode rate (25.00 vs 20.00 tokens/s; one run each, spread unknown" in inference_table
    assert "20.0% less latency" in inference_table


def test_adapter_lines_show_size_parameters_and_parity():
    results = [
        _result("full", params_trainable=3_300_000.0),
        _result("lora", adapter_mib=1.216, params_trainable=318_464.0, reload_max_abs_diff=0.0,
                merge_max_abs_diff=0.1875, merge_argmax_agree_pct=100.0),
    ]
    lines = adapter_lines(results)
    assert lines == ["lora: 1.22 MiB on disk, 318,464 trainable parameters, reloaded vs trained max |logit diff| 0, "
                     "merged vs unmerged max |logit diff| 0.188, same greedy token at 100.0% of positions"]
    assert "adapters (saved, reloaded, merged" in "\n".join(render_summary(results))

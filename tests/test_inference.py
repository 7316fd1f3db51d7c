"""Inference timing arithmetic: stamps to timings, statistics over repeats, the streamer clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorabench.kinds.inference import (
    VARIANTS,
    GenerationTiming,
    TokenClock,
    summarize_timings,
    timing_from_stamps,
    variant_by_id,
)


def test_timing_from_stamps():
    t = timing_from_stamps(10.0, [10.5, 10.6, 10.7, 10.9], 11.0)
    assert t.ttft_s == pytest.approx(0.5)
    assert t.total_s == pytest.approx(1.0)
    assert t.new_tokens == 4
    assert t.decode_s == pytest.approx(0.4)
    assert t.decode_tokens_per_s == pytest.approx(3 / 0.4)  # tokens after the first over their time


def test_timing_rejects_no_tokens_and_clocks_out_of_order():
    with pytest.raises(ValueError, match="no new token"):
        timing_from_stamps(0.0, [], 1.0)
    with pytest.raises(ValueError, match="not in order"):
        timing_from_stamps(1.0, [0.5], 2.0)
    with pytest.raises(ValueError, match="not in order"):
        timing_from_stamps(0.0, [0.2, 0.1], 1.0)


def test_one_token_has_no_decode_rate():
    assert GenerationTiming(0.1, 0.1, 1, 0.0).decode_tokens_per_s is None


def test_summary_is_medians_and_p90_over_the_repeats():
    timings = [GenerationTiming(ttft / 1000, total / 1000, 5, 0.4) for ttft, total in
               [(10, 100), (20, 200), (30, 300), (40, 400), (50, 500)]]
    s = summarize_timings(timings)
    assert s["ttft_ms"] == pytest.approx(30)
    assert s["latency_ms"] == pytest.approx(300)
    assert s["ttft_ms_p90"] == pytest.approx(46)  # numpy's linear percentile of 10..50
    assert s["latency_ms_p90"] == pytest.approx(460)
    assert s["decode_tokens_per_s"] == pytest.approx(4 / 0.4)
    assert s["inference_repeats"] == 5 and s["new_tokens"] == 5


def test_summary_needs_repeats_with_a_decode_rate():
    with pytest.raises(ValueError, match="no measured repeat"):
        summarize_timings([])
    with pytest.raises(ValueError, match="two tokens"):
        summarize_timings([GenerationTiming(0.1, 0.1, 1, 0.0)])


@given(st.lists(st.floats(min_value=0.001, max_value=10.0), min_size=1, max_size=30))
def test_p90_lies_between_the_median_and_the_maximum(latencies):
    timings = [GenerationTiming(x / 2, x, 3, x / 4) for x in latencies]
    s = summarize_timings(timings)
    assert s["latency_ms"] - 1e-9 <= s["latency_ms_p90"] <= max(latencies) * 1000 + 1e-9
    assert s["ttft_ms"] <= s["latency_ms"]


def test_token_clock_skips_the_prompt():
    clock = TokenClock()
    clock.put("prompt ids")
    clock.put("token 1")
    clock.put("token 2")
    clock.end()
    assert len(clock.stamps) == 2 and clock.stamps[0] <= clock.stamps[1]


def test_variants_are_known_by_id():
    assert [v.id for v in VARIANTS][0] == "infer_base"
    assert variant_by_id("infer_merged").merged
    with pytest.raises(KeyError, match="known: infer_base"):
        variant_by_id("infer_gguf")


def test_timed_generate_stamps_exactly_the_new_tokens(tiny_llama, cpu):
    """On the real tiny model: the streamer sees every new token, and EOS does not stop the call."""
    from lorabench.kinds.inference import load_variant, timed_generate
    from lorabench.models.loading import load_tokenizer

    model = load_variant(variant_by_id("infer_base"), tiny_llama, None, cpu)
    ids = load_tokenizer(tiny_llama)("rev 4821=", return_tensors="pt")["input_ids"]
    t = timed_generate(model, ids, 8, cpu)
    assert t.new_tokens == 8 and 0 < t.ttft_s <= t.total_s and t.decode_tokens_per_s > 0


def test_warm_up_calls_are_left_out_of_every_figure(tiny_llama, cpu):
    """A run whose timer called once (pytest-benchmark disabled) is topped up; the figures cover
    only the calls after the warm-up, the curve all of them."""
    from lorabench.kinds.inference import InferenceParams
    from lorabench.run.launch import InlineLauncher, resolve_case

    variant = variant_by_id("infer_base")
    params = InferenceParams(variant, adapter_dir=None, prompt="rev 4821=", prompts=("rev 4821=", "rev 0093="),
                             new_tokens=4, warmup=2, repeats=3)
    case = resolve_case("inference", case_id=variant.id, model="tiny-llama", dataset="digit-reverse", device=cpu,
                        config=variant.base_config(), source=tiny_llama, params=params)
    run = InlineLauncher().start(case)  # the tokenizer is the data the launcher builds
    run.prepare()
    run.step()
    result = run.finish()
    assert len(run.outputs) == 2 and run.model is None
    assert len(result.step_ms_curve) == 5 and result.metrics["inference_repeats"] == 3
    measured = sorted(result.step_ms_curve[2:])
    assert result.metrics["latency_ms"] == pytest.approx(measured[1])  # the median of the 3 measured calls
    assert "after 2 warm-up calls" in result.sources["latency_ms"]
    assert result.metrics["weights_mib"] > 0 and "peak_alloc_mib" in result.absent


def test_int8_cast_notice_is_dropped_and_nothing_else():
    import logging

    from lorabench.backends.bitsandbytes import _INT8_NOTICE_FILTER

    def record(msg):
        return logging.LogRecord("bitsandbytes.autograd._functions", logging.WARNING, __file__, 1, msg, (), None)

    assert not _INT8_NOTICE_FILTER.filter(record("MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16"))
    assert _INT8_NOTICE_FILTER.filter(record("something else"))

"""Multi-process cases: the configuration axis, one record from every rank's, scaling efficiency."""

from __future__ import annotations

import pytest

from lorabench.config import BenchConfig
from lorabench.distributed import combine_ranks, record_scaling
from lorabench.errors import ConfigError
from lorabench.result import STATUS_DOES_NOT_FIT, CaseResult


@pytest.mark.parametrize("fields, message", [
    ({"world_size": 2}, "needs a strategy: ddp or fsdp"),
    ({"strategy": "ddp"}, "needs world_size of at least 2"),
    ({"strategy": "zero3", "world_size": 2}, "strategy='zero3' is not allowed; choose one of none, ddp, fsdp"),
    ({"world_size": 0}, "world_size=0 must be at least 1"),
    ({"strategy": "fsdp", "world_size": 2, "quant": "nf4"}, "sharding a bitsandbytes-quantized base is not supported"),
])
def test_a_bad_spread_is_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BenchConfig("x", **fields)


def test_a_multi_process_configuration_carries_its_markers():
    assert BenchConfig("x", world_size=2, strategy="fsdp").markers == ("lora", "distributed", "fsdp")
    assert "distributed" not in BenchConfig("x").markers


def _rank(peak, weights, tokens, losses, **extra):
    r = CaseResult(case_id="lora_ddp2", config_id="lora_ddp2", model="m", dataset="d", device="cpu", config={})
    for name, value in dict(peak_rss_delta_mib=peak, weights_mib=weights, tokens_per_s=tokens, samples_per_s=tokens / 10,
                            step_ms=100.0, eval_loss=0.5, **extra).items():
        r.set(name, value, source="meter")
    r.loss_curve = losses
    return r


def test_one_record_from_every_rank():
    ranks = [_rank(120.0, 3.0, 400.0, [2.0, 1.0]), _rank(130.0, 3.0, 380.0, [4.0, 2.0])]
    result = combine_ranks(ranks, "ddp")
    m = result.metrics
    assert m["peak_rss_delta_mib"] == 130.0  # the device that needs the most decides whether it fits
    assert "largest of 2 ranks" in result.sources["peak_rss_delta_mib"]
    assert m["tokens_per_s"] == 780.0 and m["tokens_per_s_per_device"] == 390.0 and m["samples_per_s"] == 78.0
    assert m["world_size"] == 2
    assert result.loss_curve == [3.0, 1.5] and m["train_loss_first"] == 3.0 and m["loss_drop"] == 1.5
    assert m["eval_loss"] == 0.5  # every rank evaluates the same replica: rank 0's
    assert [r["peak_rss_delta_mib"] for r in result.details["ranks"]] == [120.0, 130.0]
    assert result.details["strategy"] == "ddp"
    assert ranks[0].metrics["peak_rss_delta_mib"] == 120.0  # the ranks' own records are left alone


def test_a_rank_that_did_not_fit_makes_the_case_not_fit():
    ranks = [_rank(1.0, 1.0, 1.0, [1.0]), _rank(1.0, 1.0, 1.0, [1.0])]
    ranks[1].status, ranks[1].error = STATUS_DOES_NOT_FIT, "out of memory"
    assert combine_ranks(ranks, "fsdp").status == STATUS_DOES_NOT_FIT


def test_scaling_efficiency_against_the_single_device_case():
    single = _rank(100.0, 3.0, 500.0, [1.0])
    single.config_id = "lora"
    case = combine_ranks([_rank(100.0, 3.0, 400.0, [1.0]), _rank(100.0, 3.0, 400.0, [1.0])], "ddp")
    record_scaling(case, [single], "lora")
    assert case.metrics["scaling_efficiency_pct"] == pytest.approx(80.0)  # 800 tokens/s of a linear 1000
    alone = combine_ranks([_rank(1.0, 1.0, 1.0, [1.0])] * 2, "ddp")
    record_scaling(alone, [], "lora")
    assert "lora, the single-device case, did not run before it" in alone.absent["scaling_efficiency_pct"]
    record_scaling(alone, [single], None)
    assert "no single-device configuration" in alone.absent["scaling_efficiency_pct"]

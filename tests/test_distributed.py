"""Multi-process cases: the configuration axis, one record from every rank's, scaling efficiency."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorabench.config import BenchConfig
from lorabench.run.distributed import combine_ranks, record_scaling
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
    assert BenchConfig("x", world_size=2, strategy="fsdp").markers == ("lora", "checkpointing", "distributed", "fsdp")
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


def test_a_case_needs_one_gpu_per_rank(monkeypatch):
    import torch

    from lorabench.run.distributed import devices_missing

    config = BenchConfig("lora_ddp2", world_size=2, strategy="ddp")
    assert devices_missing(config, torch.device("cpu")) == ""  # ranks share the CPU's cores
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "needs 2 CUDA devices (one per rank), 1 visible" in devices_missing(config, torch.device("cuda", 0))


def test_a_launch_that_dies_before_rank_0_connects_says_what_torchrun_printed(tmp_path):
    import subprocess
    import sys
    from multiprocessing.connection import Listener

    from lorabench.run.distributed import _accept
    from lorabench.run.isolation import ChildFailed

    output = tmp_path / "ranks.log"
    with output.open("w") as out:
        launcher = subprocess.Popen([sys.executable, "-c", "print('no such GPU'); raise SystemExit(3)"], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    with pytest.raises(ChildFailed, match="(?s)torchrun exited with code 3 before rank 0 connected.*no such GPU"):
        _accept(Listener(("127.0.0.1", 0), authkey=b"k"), launcher, 60, output)


# ----- end to end: lora, then lora_ddp2 and lora_fsdp2 on two gloo ranks each ----------------------
ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTED = ("lora_ddp2", "lora_fsdp2")


def _shipped_gates(ids) -> str:
    """thresholds.yaml's own rules for ``ids`` (every profile), so the test exercises the shipped gates."""
    import yaml

    data = yaml.safe_load((ROOT / "thresholds.yaml").read_text())
    profiles = {name: {c: rules for c, rules in body.items() if c in ids} for name, body in data["profiles"].items()}
    return yaml.safe_dump({"version": 1, "profiles": {k: v for k, v in profiles.items() if v}}, sort_keys=False)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    import json
    import random
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("ranks")
    rng = random.Random(0)
    rows = ["".join(rng.choice("0123456789") for _ in range(4)) for _ in range(48)]
    (tmp / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"rev {d}=", "completion": d[::-1]}) + "\n"
                                            for d in rows))
    (tmp / "gates.yaml").write_text(_shipped_gates(DISTRIBUTED))
    cases = [f"{ROOT / 'bench' / 'test_finetune.py'}::test_finetune[{c}]" for c in ("lora", *DISTRIBUTED)]
    proc = subprocess.run([sys.executable, "-m", "pytest", *cases, "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                           "--steps", "4", "--set", "warmup_steps=1", "--dataset", str(tmp / "rows.jsonl"),
                           "--thresholds", str(tmp / "gates.yaml"), f"--benchmark-json={tmp / 'run.json'}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    data = json.loads((tmp / "run.json").read_text())
    return proc.stdout, {b["extra_info"]["case_id"]: b for b in data["benchmarks"]}


@pytest.mark.integration
def test_two_rank_cases_record_every_rank_and_pass_the_shipped_gates(two_rank_run):
    import yaml

    stdout, benches = two_rank_run
    lora = benches["lora"]["extra_info"]["metrics"]
    shipped = yaml.safe_load(_shipped_gates(DISTRIBUTED))["profiles"]
    for case in DISTRIBUTED:
        info = benches[case]["extra_info"]
        m = info["metrics"]
        assert info["status"] == "ok" and m["world_size"] == 2
        ranks = info["details"]["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert m["peak_rss_delta_mib"] == max(r["peak_rss_delta_mib"] for r in ranks)  # the largest rank's
        assert m["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in ranks))
        assert ranks[0]["train_loss_final"] != ranks[1]["train_loss_final"]  # each rank trained on its own batches
        assert 0 < m["scaling_efficiency_pct"]  # against lora, which ran first
        assert benches[case]["stats"]["rounds"] == 3  # every measured step of both ranks, timed together
        expected = sum(len(body.get(case, [])) for name, body in shipped.items() if name in ("default", "cpu"))
        assert len(info["gates"]) == expected and all(g["status"] == "pass" for g in info["gates"]), info["gates"]
        assert "the adapter check (save, reload, merge) runs in the single-device case" in info["absent"]["adapter_mib"]
    ddp, fsdp = (benches[c]["extra_info"]["metrics"] for c in DISTRIBUTED)
    assert ddp["weights_mib"] == lora["weights_mib"] and ddp["grads_mib"] == lora["grads_mib"]  # whole replicas
    assert fsdp["weights_mib"] <= 0.55 * lora["weights_mib"] and fsdp["grads_mib"] == lora["grads_mib"] / 2
    assert "lora_fsdp2 (fsdp, 2 ranks): per rank peak RSS+" in stdout


def test_a_rank_leaves_live_tensor_bytes_absent_and_says_why():
    import torch

    from lorabench.run.distributed import TENSOR_REASON, RankParallel
    from lorabench.meters.tensor_meter import TENSOR_METRICS, TensorMeter

    meter = TensorMeter(None, None, torch.device("cpu"), 3, off=RankParallel("ddp", torch.device("cpu")).tensor_reason)
    assert meter.run(lambda: 7) == 7  # the step runs, untracked
    assert meter.stop().absent == dict.fromkeys(TENSOR_METRICS, TENSOR_REASON)

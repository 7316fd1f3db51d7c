"""Repeated seeds: --seeds parsing, one record from several seeds, compare against the spread, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorabench.commands.main import main
from lorabench.gates.compare import IMPROVED, UNCHANGED, compare_cases, Tolerances
from lorabench.matrix import DEFAULT_CONFIGS
from lorabench.errors import ConfigError
from lorabench.result import STATUS_ERROR, CaseResult
from lorabench.evaluation.seeds import SeedPlan, combine, interval, parse_seeds, separated

ROOT = Path(__file__).resolve().parent.parent
LORA = next(c.id for c in DEFAULT_CONFIGS if c.method == "lora" and c.quant == "none")  # LoRA on an unquantized base


@pytest.mark.parametrize("text, plan, seeds", [
    (None, SeedPlan(), [1234]),
    ("3", SeedPlan(count=3), [1234, 1235, 1236]),
    ("7,1,99", SeedPlan(values=(7, 1, 99)), [7, 1, 99]),
    ("5,", SeedPlan(values=(5,)), [5]),
])
def test_seeds_are_a_count_from_the_configuration_seed_or_a_list(text, plan, seeds):
    assert parse_seeds(text) == plan
    assert parse_seeds(text).for_seed(1234) == seeds


@pytest.mark.parametrize("text, words", [
    ("0", "a count from 1 to 100"), ("three", "a count from 1 to 100"), ("1,1", "seed 1 appears twice"),
    ("1,-2", "'-2' is not a seed"), ("1,4294967296", "'4294967296' is not a seed"),
])
def test_bad_seed_lists_are_refused_by_name(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_seeds(text)


def run(config_id: str, seed: int, status: str = "ok", **metrics) -> CaseResult:
    r = CaseResult(case_id=config_id, config_id=config_id, model="m", dataset="d", device="cpu",
                   config={"seed": seed, "warmup_steps": 1}, status=status)
    for name, value in metrics.items():
        r.set(name, value, source="a counter")
    r.step_ms_curve = [100.0 + seed, 10.0, 11.0]
    return r


def test_combine_keeps_each_seed_and_records_mean_spread_and_interval():
    combined = combine([run("q", 1, eval_loss=0.5), run("q", 2, eval_loss=0.7), run("q", 3, eval_loss=0.6)])
    assert combined.metrics["eval_loss"] == pytest.approx(0.6)
    spread = combined.spread["eval_loss"]
    assert spread["n"] == 3 and spread["sd"] == pytest.approx(0.1)
    # t(0.975, 2) = 4.303: the interval is mean +- 4.303 * 0.1 / sqrt(3)
    assert spread["ci_low"] == pytest.approx(0.6 - 0.2484, abs=1e-3) and spread["ci_high"] == pytest.approx(0.8484, abs=1e-3)
    assert [s["seed"] for s in combined.seeds] == [1, 2, 3]
    assert [s["metrics"]["eval_loss"] for s in combined.seeds] == [0.5, 0.7, 0.6]
    assert combined.sources["eval_loss"] == "mean over 3 seeds of: a counter"
    assert CaseResult.from_extra_info(json.loads(json.dumps(combined.to_extra_info()))) == combined


def test_an_accuracy_interval_over_two_seeds_stays_within_0_and_100_percent():
    combined = combine([run("q", 1, accuracy_pct=90.0, eval_loss=0.5), run("q", 2, accuracy_pct=70.0, eval_loss=0.9)])
    accuracy, loss = combined.spread["accuracy_pct"], combined.spread["eval_loss"]
    # t(0.975, 1) = 12.71: the raw interval of the mean, 80 +- 127, runs past both ends of 0-100%
    assert (accuracy["ci_low"], accuracy["ci_high"]) == (0.0, 100.0)
    assert loss["ci_low"] < 0.0  # a loss keeps its interval as computed


def test_combine_keeps_every_per_step_curve_of_every_seed():
    """The CPU-time curves too: compare's per-step speed test on a CPU case divides them (lorabench.gates.compare)."""
    from lorabench.gates.compare import measured_step_ratios
    from lorabench.result import STEP_CURVES

    runs = [run("q", seed) for seed in (1, 2)]
    for r in runs:
        r.step_cpu_ms_curve, r.control_cpu_ms_curve = [50.0, 20.0, 22.0], [10.0, 10.0, 11.0, 10.0]
    combined = combine(runs)
    for curve in STEP_CURVES:
        assert [s[curve] for s in combined.seeds] == [getattr(r, curve) for r in runs]
    # measured steps only, in CPU time: 20 / sqrt(10 * 11), 22 / sqrt(11 * 10), once per seed
    assert measured_step_ratios(combined) == pytest.approx([20 / 110 ** 0.5, 22 / 110 ** 0.5] * 2)


def test_one_seed_stays_a_plain_record_and_a_failing_seed_names_itself():
    single = run("q", 1, eval_loss=0.5)
    assert combine([single]) is single and not single.seeds and not single.spread
    broken = run("q", 2, status=STATUS_ERROR)
    broken.error = "training diverged"
    combined = combine([run("q", 1, eval_loss=0.5), broken])
    assert combined.status == STATUS_ERROR and combined.error == "seed 2: training diverged"


def test_a_metric_missing_at_one_seed_is_absent_with_the_reason():
    other = run("q", 2, eval_loss=0.4)
    other.absent["accuracy_pct"] = "no answers"
    combined = combine([run("q", 1, eval_loss=0.5, accuracy_pct=50.0), other])
    assert "accuracy_pct" not in combined.metrics
    assert combined.absent["accuracy_pct"] == "measured at 1 of 2 seeds; seed 2: no answers"


def test_intervals_need_two_values_and_separate_only_when_apart():
    with pytest.raises(ValueError):
        interval([1.0])
    low = combine([run("a", s, eval_loss=v) for s, v in enumerate([0.50, 0.51, 0.52])])
    high = combine([run("b", s, eval_loss=v) for s, v in enumerate([0.90, 0.91, 0.92])])
    wide = combine([run("c", s, eval_loss=v) for s, v in enumerate([0.40, 0.95, 0.60])])
    assert separated(low, high, "eval_loss") is True
    assert separated(low, wide, "eval_loss") is False
    assert separated(low, run("d", 1, eval_loss=0.1), "eval_loss") is None  # one seed: no interval


def test_compare_counts_a_move_only_beyond_the_seeds_spread():
    a = combine([run("q", s, eval_loss=v) for s, v in enumerate([0.50, 0.70, 0.60])])
    within = combine([run("q", s, eval_loss=v) for s, v in enumerate([0.45, 0.66, 0.55])])  # -8%, noise
    apart = combine([run("q", s, eval_loss=v) for s, v in enumerate([0.30, 0.31, 0.29])])   # -50%, real
    row = next(r for r in compare_cases("q", a, within, Tolerances()) if r.metric == "eval_loss")
    assert row.status == UNCHANGED and "Welch t-test over 3 and 3 seeds" in row.note and "within the seeds' spread" in row.note
    row = next(r for r in compare_cases("q", a, apart, Tolerances()) if r.metric == "eval_loss")
    assert row.status == IMPROVED and "Welch t-test" in row.note
    single = run("q", 9, eval_loss=0.45)
    row = next(r for r in compare_cases("q", a, single, Tolerances()) if r.metric == "eval_loss")
    assert row.status == UNCHANGED and "one-sample t-test against 3 seeds" in row.note


@pytest.mark.integration
def test_three_seeds_of_one_case_end_to_end(tmp_path):
    """--seeds 3 runs the case three times; the record, the summary and the report show the spread."""
    gates = tmp_path / "gates.yaml"
    gates.write_text(f"version: 1\nprofiles:\n  default:\n    {LORA}:\n      - eval_loss <= 1.5 * self.eval_loss_before\n")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "-k", f"config[{LORA}]", "--seeds", "3", "--steps", "4", "--isolate", "none",
         f"--thresholds={gates}", f"--benchmark-json={out}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 seeds: mean ± standard deviation" in proc.stdout
    (bench,) = json.loads(out.read_text())["benchmarks"]
    info = bench["extra_info"]
    assert [s["seed"] for s in info["seeds"]] == [1234, 1235, 1236]
    losses = [s["metrics"]["eval_loss"] for s in info["seeds"]]
    assert len(set(losses)) == 3  # different seeds, different training
    assert info["metrics"]["eval_loss"] == pytest.approx(sum(losses) / 3)
    assert info["spread"]["eval_loss"]["ci_low"] < info["metrics"]["eval_loss"] < info["spread"]["eval_loss"]["ci_high"]
    assert bench["stats"]["rounds"] == 4 - 3  # pytest-benchmark times the first seed's measured steps
    assert all(g["status"] == "pass" for g in info["gates"]) and info["gates"]
    assert main(["report", str(out), "--out", str(tmp_path / "reports")]) == 0
    md = (tmp_path / "reports" / "summary.md").read_text()
    assert "### Seeds" in md and f"| {LORA} | 1235 |" in md and " ± " in md

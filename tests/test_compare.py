"""Comparing stored runs: direction-aware, tolerance-aware, per-step timing statistics, machine warnings."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabench.report import compare_output
from lorabench.commands.main import main
from lorabench.gates.compare import (
    IMPROVED,
    NEW,
    PER_STEP_METRICS,
    REGRESSED,
    UNCHANGED,
    Tolerances,
    compare_runs,
    machine_warnings,
    parse_tolerances,
)
from lorabench.errors import HistoryError, ThresholdError
from lorabench.storage.history import StoredRun, latest_runs, load_runs, read_run, select_run
from lorabench.metrics import METRICS
from lorabench.result import STATUS_DOES_NOT_FIT, CaseResult

MACHINE = {"cpu": "x86_64", "cpu_isa": "AVX2", "gpu_name": None, "torch_version": "2.13.0", "peft_version": "0.21.2"}


def case(case_id="qlora_nf4", steps=None, controls=None, **metrics) -> CaseResult:
    rng = random.Random(case_id)
    r = CaseResult(case_id=case_id, config_id=case_id, model="tiny-llama", dataset="digit-reverse", device="cpu",
                   config={"warmup_steps": 2, "rank": 16, "quant": "nf4", "method": "lora"})
    r.metrics.update({"peak_rss_delta_mib": 100.0, "weights_mib": 3.0, "eval_loss": 0.5, "tokens_per_s": 2000.0,
                      "step_ms": 100.0, "params_trainable": 1000.0, "train_s": 3.0})
    r.metrics.update(metrics)
    r.step_ms_curve = steps if steps is not None else [300.0, 200.0] + [100 + rng.uniform(-3, 3) for _ in range(20)]
    r.control_ms_curve = [10.0] * len(r.step_ms_curve) if controls is None else controls
    r.metrics.setdefault("step_control_ratio", r.metrics["step_ms"] / 10.0)
    r.loss_curve = [3.0 - 0.1 * i for i in range(len(r.step_ms_curve))]
    return r


def run(*results: CaseResult, number=1, machine=None) -> StoredRun:
    return StoredRun(path=Path(f"{number:04d}_x.json"), number=number, name="x", datetime="", commit={"id": "abc"},
                     machine=machine or dict(MACHINE), results={r.case_id: r for r in results})


def statuses(comparison) -> dict[tuple[str, str], str]:
    return {(r.case_id, r.metric): r.status for r in comparison.rows}


def test_a_run_compared_with_itself_has_no_regression():
    a = run(case("qlora_nf4"), case("lora"))
    c = compare_runs(a, copy.deepcopy(a))
    assert c.rows and not c.regressions
    assert {r.status for r in c.rows} == {UNCHANGED}


metric_names = st.sampled_from(sorted(n for n, m in METRICS.items() if m.better))
gated_names = st.sampled_from(sorted(n for n, m in METRICS.items() if m.better and m.gated))


@settings(max_examples=60, deadline=None)
@given(values=st.dictionaries(metric_names, st.floats(1e-3, 1e6, allow_nan=False), min_size=1))
def test_comparing_any_run_with_itself_never_regresses(values):
    a = run(case(**values))
    assert not compare_runs(a, copy.deepcopy(a)).regressions


@settings(max_examples=60, deadline=None)
@given(name=gated_names, factor=st.floats(1.3, 10))
def test_a_move_past_the_tolerance_is_judged_by_direction(name, factor):
    """Up by 30%+ is a regression for lower-is-better metrics and an improvement for higher-is-better."""
    a = case(steps=[100.0] * 22, **{name: 50.0})
    b = case(steps=[100.0] * 22, **{name: 50.0 * factor})
    if name in PER_STEP_METRICS:  # these also need the per-step samples to move the same way
        worse = METRICS[name].better == "lower"
        b.step_ms_curve = [100.0 * (factor if worse else 1 / factor)] * 22
    status = statuses(compare_runs(run(a), run(b)))[("qlora_nf4", name)]
    assert status == (REGRESSED if METRICS[name].better == "lower" else IMPROVED)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(n for n, m in METRICS.items() if not m.gated)), factor=st.floats(0.1, 10))
def test_informational_figures_never_gate(name, factor):
    """Wall-clock and one-shot figures (step_ms, load_s, adapter_check_s, phases) are shown, never regressions."""
    c = compare_runs(run(case(**{name: 50.0})), run(case(**{name: 50.0 * factor})))
    row = next(r for r in c.rows if r.metric == name)
    assert row.status != REGRESSED and not c.regressions


def test_a_reduction_in_memory_is_an_improvement_and_reads_negative():
    c = compare_runs(run(case(peak_rss_delta_mib=100.0)), run(case(peak_rss_delta_mib=80.0)))
    row = next(r for r in c.rows if r.metric == "peak_rss_delta_mib")
    assert (row.status, round(row.change_pct, 1)) == (IMPROVED, -20.0)


def test_moves_within_the_tolerance_are_unchanged_and_the_tolerance_is_per_metric():
    a, b = case(weights_mib=3.0), case(weights_mib=3.2)  # +6.7%
    assert statuses(compare_runs(run(a), run(b)))[("qlora_nf4", "weights_mib")] == UNCHANGED  # memory: 10%
    strict = parse_tolerances({"tolerance_pct": {"weights_mib": 5}}, "th.yaml")
    assert statuses(compare_runs(run(a), run(b), strict))[("qlora_nf4", "weights_mib")] == REGRESSED
    by_group = parse_tolerances({"tolerance_pct": {"memory": 1, "weights_mib": 50}}, "th.yaml")
    assert statuses(compare_runs(run(a), run(b), by_group))[("qlora_nf4", "weights_mib")] == UNCHANGED


def test_a_slowdown_of_30_percent_in_step_time_is_caught():
    a = case()
    b = case(step_ms=130.0, tokens_per_s=2000 / 1.3, step_control_ratio=13.0,
             steps=[300.0, 200.0] + [130 + random.Random(1).uniform(-4, 4) for _ in range(20)])
    c = compare_runs(run(a), run(b))
    s = statuses(c)
    assert s[("qlora_nf4", "step_control_ratio")] == REGRESSED
    assert "95% bound +2" in next(r.note for r in c.rows if r.metric == "step_control_ratio")
    assert s[("qlora_nf4", "step_ms")] != REGRESSED  # raw wall time is informational: the ratio gates


def test_a_busier_machine_slows_step_and_control_alike_and_is_not_a_regression():
    """Twice as slow steps with a twice as slow control: the machine, not the code."""
    rng = random.Random(2)
    slow_steps = [600.0, 400.0] + [200 + rng.uniform(-6, 6) for _ in range(20)]
    b = case(step_ms=200.0, tokens_per_s=1000.0, step_control_ratio=10.0, steps=slow_steps,
             controls=[20.0 + rng.uniform(-0.5, 0.5) for _ in range(22)])
    c = compare_runs(run(case()), run(b))
    assert not c.regressions
    assert statuses(c)[("qlora_nf4", "step_ms")] == "changed"  # shown, with a note, not gated
    assert "informational" in next(r.note for r in c.rows if r.metric == "step_ms")


def test_a_step_time_move_that_the_steps_do_not_support_is_not_a_regression():
    """Median ratio up 18% but the per-step samples overlap completely: noise, not a regression."""
    steps_a = [300.0, 200.0] + [80, 120, 95, 130, 70, 115, 100, 125, 85, 110]
    steps_b = [300.0, 200.0] + [120, 80, 130, 95, 115, 70, 125, 100, 110, 85]
    c = compare_runs(run(case(step_control_ratio=10.0, steps=steps_a)),
                     run(case(step_control_ratio=11.8, steps=steps_b)))
    row = next(r for r in c.rows if r.metric == "step_control_ratio")
    assert row.status == UNCHANGED and "within the ±15% tolerance" in row.note


def test_a_median_past_the_tolerance_whose_bound_is_not_is_not_a_regression():
    """Median ratio up 18% on a wide spread (a loaded machine): significant, but the data cannot show the
    shift exceeds the 15% minimum effect; the same shift on tight steps can, and fails."""
    rng = random.Random(5)
    wide_a = [300.0, 200.0] + [100 * rng.uniform(0.8, 1.25) for _ in range(17)]
    wide_b = [300.0, 200.0] + [118 * rng.uniform(0.8, 1.25) for _ in range(17)]
    c = compare_runs(run(case(step_control_ratio=10.0, steps=wide_a)),
                     run(case(step_control_ratio=11.8, steps=wide_b)))
    assert statuses(c)[("qlora_nf4", "step_control_ratio")] == UNCHANGED
    tight_a = [300.0, 200.0] + [100 * rng.uniform(0.98, 1.02) for _ in range(17)]
    tight_b = [300.0, 200.0] + [118 * rng.uniform(0.98, 1.02) for _ in range(17)]
    c = compare_runs(run(case(step_control_ratio=10.0, steps=tight_a)),
                     run(case(step_control_ratio=11.8, steps=tight_b)))
    assert statuses(c)[("qlora_nf4", "step_control_ratio")] == REGRESSED


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1, 1e3), min_size=3, max_size=25), st.lists(st.floats(1, 1e3), min_size=3, max_size=25),
       st.floats(0.25, 4.0))
def test_the_shift_bounds_bracket_the_estimate_and_a_scaled_copy_reads_its_factor(xs, ys, factor):
    from lorabench.gates.compare import step_ratio_shift

    def timed(steps):
        r = case(steps=[1.0, 1.0] + steps)
        r.control_ms_curve = [1.0] * len(r.step_ms_curve)
        return r

    shift = step_ratio_shift(timed(xs), timed(ys), 0.05)
    if shift is not None:
        assert shift.lower <= shift.estimate <= shift.upper
    scaled = step_ratio_shift(timed(xs), timed([x * factor for x in xs]), 0.05)
    if scaled is not None:
        assert scaled.estimate == pytest.approx(factor - 1, rel=1e-9, abs=1e-12)


def test_warm_up_steps_are_not_part_of_the_timing_test():
    # identical measured steps, very different warm-up steps: no move
    a = case(steps=[900.0, 900.0] + [100.0] * 10, step_control_ratio=10.0)
    b = case(steps=[10.0, 10.0] + [100.0] * 10, step_control_ratio=12.0)
    row = next(r for r in compare_runs(run(a), run(b)).rows if r.metric == "step_control_ratio")
    assert row.status == UNCHANGED and "per-step shift +0.0%" in row.note


def test_a_run_without_control_times_is_not_gated_on_speed():
    a, b = case(), case(step_control_ratio=20.0)
    a.control_ms_curve = b.control_ms_curve = []
    row = next(r for r in compare_runs(run(a), run(b)).rows if r.metric == "step_control_ratio")
    assert row.status != REGRESSED and "not gated" in row.note


def test_a_case_that_stops_working_or_disappears_is_a_regression():
    a = run(case("qlora_nf4"), case("lora"), case("qlora_fp4"))
    broken = case("lora")
    broken.status, broken.error = STATUS_DOES_NOT_FIT, "out of memory"
    b = run(case("qlora_nf4"), broken, case("full"))
    s = statuses(compare_runs(a, b))
    assert s[("lora", "status")] == REGRESSED
    assert s[("qlora_fp4", "status")] == REGRESSED
    assert s[("full", "status")] == NEW


def test_a_metric_no_longer_measured_is_a_regression_with_the_reason():
    b = case()
    del b.metrics["eval_loss"]
    b.absent["eval_loss"] = "no eval set"
    c = compare_runs(run(case()), run(b))
    row = next(r for r in c.rows if r.metric == "eval_loss")
    assert row.status == REGRESSED and "no eval set" in row.note


def test_machine_differences_are_warned_about():
    other = dict(MACHINE, gpu_name="NVIDIA H100", torch_version="2.14.1")
    warnings = machine_warnings(MACHINE, other)
    assert any("gpu_name" in w and "NVIDIA H100" in w for w in warnings)
    assert any("torch_version" in w for w in warnings)
    assert machine_warnings(MACHINE, dict(MACHINE)) == []
    assert compare_runs(run(case()), run(case(), machine=other)).warnings == warnings


def test_a_change_in_machine_load_is_warned_about():
    quiet = dict(MACHINE, load_avg_1m_start=0.2, load_avg_1m_end=1.1)
    busy = dict(MACHINE, load_avg_1m_start=0.5, load_avg_1m_end=6.8)
    assert machine_warnings(quiet, dict(quiet, load_avg_1m_end=1.9)) == []
    [warning] = machine_warnings(quiet, busy)
    assert "up to 1.1 in A, 6.8 in B" in warning


@pytest.mark.parametrize("section, match", [
    ({"tolerance": 5}, "unknown key 'tolerance'"),
    ({"tolerance_pct": {"speeed": 5}}, "unknown key 'speeed'"),
    ({"tolerance_pct": {"memory": -1}}, "must be a number >= 0"),
    ({"tolerance_pct": {"memory": "10%"}}, "must be a number >= 0"),
    ({"alpha": 1.5}, "between 0 and 1"),
    ({"tolerance_pct": [5]}, "must be a mapping"),
])
def test_bad_compare_sections_name_the_key(section, match):
    with pytest.raises(ThresholdError, match=match):
        parse_tolerances(section, "th.yaml")


def test_the_shipped_tolerances_parse():
    import yaml

    section = yaml.safe_load((Path(__file__).parent.parent / "thresholds.yaml").read_text())["compare"]
    tol = parse_tolerances(section, "thresholds.yaml")
    assert isinstance(tol, Tolerances) and tol.for_metric(METRICS["step_ms"]) < 0.3  # a 30% slowdown is caught


# ----- stored files and the command line ------------------------------------------------
def write_run(storage: Path, number: int, *results: CaseResult, commit="c0ffee1234", machine=None) -> Path:
    folder = storage / "Linux-CPython-3.11-64bit"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{number:04d}_{commit}_20261123.json"
    data = {"machine_info": machine or MACHINE, "commit_info": {"id": commit}, "datetime": f"2026-11-23T00:0{number}",
            "benchmarks": [{"name": f"test_finetune[{r.case_id}]", "stats": {}, "extra_info": r.to_extra_info()}
                           for r in results]}
    path.write_text(json.dumps(data))
    return path


def test_runs_are_selected_by_number_file_and_commit(tmp_path):
    first = write_run(tmp_path, 1, case(), commit="aaaa1111")
    write_run(tmp_path, 2, case(), commit="bbbb2222")
    assert select_run("1", tmp_path).path == first
    assert select_run("0001", tmp_path).path == first
    assert select_run(str(first), tmp_path).path == first
    assert select_run("aaaa11", tmp_path).path == first
    assert [r.number for r in latest_runs(2, tmp_path)] == [1, 2]
    with pytest.raises(HistoryError, match="'7': no stored run matches"):
        select_run("7", tmp_path)
    with pytest.raises(HistoryError, match="3 needed"):
        latest_runs(3, tmp_path)


def test_a_broken_file_is_skipped_with_a_warning_and_named(tmp_path, caplog):
    write_run(tmp_path, 1, case())
    broken = tmp_path / "Linux-CPython-3.11-64bit" / "0002_truncated.json"
    broken.write_text('{"benchmarks": [')
    assert [r.number for r in load_runs(tmp_path)] == [1]
    assert "0002_truncated.json" in caplog.text
    with pytest.raises(HistoryError, match="not a readable JSON file"):
        read_run(broken)


def test_cli_fail_exits_1_on_a_regression_and_names_metric_and_case(tmp_path, capsys):
    write_run(tmp_path, 1, case("qlora_nf4"), case("lora"))
    write_run(tmp_path, 2, case("qlora_nf4"), case("lora", peak_rss_delta_mib=120.0))  # +20%
    outputs = {k: tmp_path / f"cmp.{k}" for k in ("csv", "json", "md")}
    code = main(["compare", "--storage", str(tmp_path), "--fail", "--csv", str(outputs["csv"]),
                 "--json", str(outputs["json"]), "--markdown", str(outputs["md"])])
    out = capsys.readouterr().out
    assert code == 1
    assert "lora: peak_rss_delta_mib 100 -> 120 (+20.0%, tolerance ±10%)" in out
    data = json.loads(outputs["json"].read_text())
    assert [(r["case_id"], r["metric"]) for r in data["rows"] if r["status"] == REGRESSED] == [("lora", "peak_rss_delta_mib")]
    assert "lora,peak_rss_delta_mib,100.0,120.0" in outputs["csv"].read_text()
    assert "**regressed**" in outputs["md"].read_text()
    assert main(["compare", "1", "1", "--storage", str(tmp_path), "--fail"]) == 0
    assert main(["compare", "2", "--storage", str(tmp_path)]) == 0  # without --fail, a report only


def test_cli_bad_input_exits_2_with_the_reason(tmp_path, capsys):
    assert main(["compare", "--storage", str(tmp_path / "nowhere")]) == 2
    assert "no pytest-benchmark storage here" in capsys.readouterr().err


def test_terminal_table_hides_unchanged_rows_unless_asked():
    c = compare_runs(run(case()), run(case(weights_mib=6.0)))
    short, full = compare_output.terminal(c), compare_output.terminal(c, show_all=True)
    assert len(full) > len(short)
    assert any("weights_mib" in line and "regressed" in line for line in short)
    assert not any("eval_loss" in line for line in short)

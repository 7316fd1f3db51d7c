"""Summary wording: a reduction reads as a reduction, deltas are signed the way numbers move."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from lorabench.storage.history import read_run
from lorabench.result import CaseResult
from lorabench.report.tables import FILE_WIDTH
from lorabench.report.summary import describe, findings, format_delta, relative_change, render_summary, verdict

DATA = Path(__file__).resolve().parent / "data"
positive = st.floats(1e-3, 1e6, allow_nan=False)


def result(config_id: str, **metrics) -> CaseResult:
    r = CaseResult(case_id=config_id, config_id=config_id, model="m", dataset="d", device="cpu", config={})
    r.metrics.update(metrics)
    return r


def test_memory_reduction_is_negative_and_worded_as_less():
    assert format_delta(3.1, 14.4) == "-78.5%"
    text = describe("peak_rss_delta_mib", "peak memory", 3.1, 14.4)
    assert text.startswith("78.5% less peak memory") and text.endswith("better)")
    assert describe("step_ms", "step time", 150, 100).startswith("50.0% more step time")
    assert describe("tokens_per_s", "throughput", 50, 100).startswith("50.0% lower throughput")


@given(value=positive, base=positive)
def test_delta_sign_matches_the_move(value, base):
    delta = format_delta(value, base)
    change = relative_change(value, base)
    if change * 100 >= 0.05:
        assert delta.startswith("+")
    elif change * 100 <= -0.05:
        assert delta.startswith("-")
    text = describe("weights_mib", "weight memory", value, base)
    if value < base and abs(change) >= 0.0005:
        assert " less " in text and "better" in text
    if value > base and abs(change) >= 0.0005:
        assert " more " in text and "worse" in text


def test_verdict_follows_the_metric_direction():
    assert verdict("step_ms", 1, 2) == "better"
    assert verdict("tokens_per_s", 1, 2) == "worse"
    assert verdict("train_loss_first", 1, 2) == "same"


def test_summary_has_a_baseline_column_and_computed_findings():
    rows = [result("full", tensor_peak_mib=100.0, peak_rss_delta_mib=150.0, weights_mib=10.0, step_ms=50.0,
                   eval_loss=1.0),
            result("qlora_nf4", tensor_peak_mib=40.0, peak_rss_delta_mib=120.0, weights_mib=3.0, step_ms=60.0,
                   eval_loss=0.9)]
    lines = render_summary(rows, {"pass": 3}, width=FILE_WIDTH)  # one line per case, as in a file
    text = "\n".join(lines)
    assert "baseline full" in text
    assert lines[1].split()[2:5] == ["tensor", "peak", "MiB"]  # exact tensor bytes lead on the CPU
    assert "40.00 (-60.0%)" in text and "process RSS+ MiB" in text
    assert "gates: 3 pass" in text
    found = findings(rows)
    assert found[0].startswith("qlora_nf4 vs full: 60.0% less peak memory (live tensor bytes)")
    assert "20.0% less process memory (peak RSS added)" in found[0]
    assert "20.0% more step time" in found[0]
    # one seed each: the eval losses are listed, and neither is called the lowest
    assert found[-1].startswith("eval loss from one seed each, so no case is shown to have the lowest")
    assert "qlora_nf4 0.9, full 1.00 nats" in found[-1]
    assert "step time (60.00 vs 50.00 ms; one run each, spread unknown" in found[0]


def seeded(config_id: str, **per_seed) -> CaseResult:
    """A record combined from one run per seed: ``eval_loss=[0.5, 0.6, 0.7]`` gives three seeds."""
    from lorabench.evaluation.seeds import combine

    n = len(next(iter(per_seed.values())))
    runs = []
    for i in range(n):
        r = result(config_id, **{name: values[i] for name, values in per_seed.items()})
        r.config = {"seed": 1234 + i}
        runs.append(r)
    return combine(runs)


def test_overlapping_seed_intervals_are_not_called_a_difference():
    lora = seeded("lora", eval_loss=[0.60, 0.80, 0.70], weights_mib=[6.0, 6.0, 6.0])
    qlora = seeded("qlora_nf4", eval_loss=[0.55, 0.85, 0.62], weights_mib=[3.0, 3.0, 3.0])
    found = findings([lora, qlora])
    assert "50.0% less weight memory (3.00 vs 6.00 MiB, better)" in found[0]  # no spread at all: apart
    assert found[-1].startswith("qlora_nf4 has the lowest eval loss (0.673 nats, 95% interval")
    assert found[-1].endswith("but is not distinguishable at 3 seeds from lora")
    assert not any(f.startswith("lowest eval loss") for f in found)


def test_separated_seed_intervals_name_the_lowest():
    full = seeded("full", eval_loss=[1.00, 1.02, 1.01])
    qlora = seeded("qlora_nf4", eval_loss=[0.50, 0.52, 0.51])
    line = findings([full, qlora])[-1]
    assert line.startswith("lowest eval loss: qlora_nf4 (0.51 nats, 95% interval 0.485-0.535 over 3 seeds)")
    text = "\n".join(render_summary([full, qlora], width=FILE_WIDTH))
    assert "3 seeds: mean ± standard deviation" in text and "0.51 ± 0.01 (-49.5%)" in text


def test_a_case_that_did_not_run_is_never_the_baseline():
    failed = result("full")
    failed.status = "does_not_fit"
    ok = result("lora", weights_mib=1.0)
    assert "baseline lora" in render_summary([failed, ok])[0]


def test_accuracy_shows_its_interval_and_quantization_error_gets_its_own_table():
    ok = result("full", accuracy_pct=88.7, accuracy_ci_low_pct=84.2, accuracy_ci_high_pct=92.0, accuracy_n=256,
                accuracy_gain_pp=88.7, eval_loss=0.1)
    quant = result("quant_error_normal", nf4_rel_error_mean=0.092, fp4_rel_error_mean=0.122)
    quant.config = {"kind": "quant_error"}
    lower = result("lora", accuracy_pct=40.0, accuracy_ci_low_pct=34.2, accuracy_ci_high_pct=46.1,
                   accuracy_n=256, eval_loss=0.3)
    close = result("qlora_nf4", accuracy_pct=86.0, accuracy_ci_low_pct=81.2, accuracy_ci_high_pct=89.7,
                   accuracy_n=256, eval_loss=0.3)
    text = "\n".join(render_summary([ok, lower, quant], width=FILE_WIDTH))
    assert "88.7 [84.2-92.0]" in text
    # one seed, but accuracy has its Wilson interval: apart from lora's, so full is the highest
    assert ("highest accuracy: full (88.7%, 95% interval 84.2-92.0%, Wilson, n=256, +88.7 pp over the base "
            "model)" in text)
    assert "full has the highest accuracy (88.7%" in findings([ok, lower, close])[-1]
    assert findings([ok, lower, close])[-1].endswith("not distinguishable (95% intervals overlap) from qlora_nf4")
    assert "NF4 err" in text and "24.6% less reconstruction error" in text


def test_the_tensor_peak_is_shown_with_its_parts_largest_first():
    row = result("full", tensor_peak_mib=30.0, tensor_params_mib=6.0, tensor_buffers_mib=0.0, tensor_grads_mib=0.0,
                 tensor_optimizer_mib=12.0, tensor_activations_mib=10.0, tensor_temporaries_mib=2.0)
    text = "\n".join(render_summary([row], width=FILE_WIDTH))
    assert "full: 30.00 MiB = optimizer 12.00 + activations 10.00 + params 6.00 + temporaries 2.00" in text


def test_no_case_is_best_when_all_score_the_same():
    cases = [result(c, accuracy_pct=0.0, accuracy_ci_low_pct=0.0, accuracy_ci_high_pct=8.8, accuracy_n=40)
             for c in ("full", "lora")]
    assert findings(cases)[-1] == "the same accuracy in every case (0.0%)"


def timed(config_id: str, ratios: list[float], ms: float, **metrics) -> CaseResult:
    """A case whose measured steps took ``ratios`` times their control's 10 ms (no warm-up steps)."""
    r = result(config_id, step_control_ratio=statistics.median(ratios), step_ms=ms, **metrics)
    r.config = {"warmup_steps": 0}
    r.control_ms_curve = r.control_cpu_ms_curve = [10.0] * (len(ratios) + 1)
    r.step_ms_curve = r.step_cpu_ms_curve = [10.0 * x for x in ratios]
    return r


def test_a_speed_difference_is_judged_on_step_control_and_only_where_the_steps_separate():
    rng = random.Random(0)
    noisy = lambda centre: [centre * rng.uniform(0.8, 1.25) for _ in range(20)]  # noqa: E731
    base = timed("full", noisy(8.0), 120.0)
    same = timed("lora", noisy(8.4), 80.0)  # raw step time 33% lower, the gated figure within its spread
    slow = timed("qlora_nf4", noisy(16.0), 130.0)
    found = findings([base, same, slow])
    assert "more step time over its control" in found[0] and "not shown past the ±15% minimum effect" in found[0]
    assert "better" not in found[0].split("step time over its control")[1] and "worse" not in found[0]
    assert "[raw step time 80.00 vs 120.0 ms, wall clock, not judged]" in found[0]
    assert "100.0% more step time over its control" not in found[1]
    assert "more step time over its control (" in found[1] and "worse)" in found[1]


def test_two_unchanged_runs_never_call_a_speed_difference_better_in_one_and_worse_in_the_other():
    """Two unchanged `pytest bench/ -m qlora --steps 20` runs (tests/data/qlora-pair-*.json, recorded on a
    2-core machine shared with other work): each case against the baseline reads the same way in both, or is
    not shown to differ in one of them."""
    runs = [read_run(DATA / f"qlora-pair-{i}.json") for i in (1, 2)]
    verdicts = []
    for run in runs:
        results = list(run.results.values())
        lines = [f for f in findings(results) if " vs " in f]
        verdict = {}
        for line in lines:
            case, speed = line.split(" vs ", 1)[0], line.split("step time over its control", 1)[1]
            verdict[case] = "better" if "better)" in speed.split("[")[0] else "worse" if "worse)" in speed.split("[")[0] else "-"
        verdicts.append(verdict)
    assert verdicts[0].keys() == verdicts[1].keys() and len(verdicts[0]) >= 4
    for case in verdicts[0]:
        assert {verdicts[0][case], verdicts[1][case]} != {"better", "worse"}, (case, verdicts)


def test_raw_times_are_called_incomparable_under_workers_or_load():
    base, other = result("full", step_ms=50.0), result("lora", step_ms=40.0)
    for r in (base, other):
        r.environment = {"cpu_count": 2, "load_avg_1m_start": 1.0, "load_avg_1m_end": 1.5}
    assert not any("not comparable" in line for line in render_summary([base, other]))
    text = " ".join(render_summary([base, other], workers=2, width=FILE_WIDTH))
    assert "2 pytest-xdist workers (-n 2) trained cases at the same time on 2 cores" in text
    other.environment["load_avg_1m_end"] = 5.2
    text = " ".join(render_summary([base, other], width=FILE_WIDTH))
    assert "raw step ms and tokens/s are wall clock and not comparable" in text and "reached 5.2 on 2 cores" in text


def test_with_seeds_the_accuracy_column_shows_the_interval_its_title_promises():
    acc = seeded("lora", accuracy_pct=[40.0, 44.0, 42.0])
    text = "\n".join(render_summary([acc], width=FILE_WIDTH))
    assert "acc % [95% CI]" in text
    low, high = acc.spread["accuracy_pct"]["ci_low"], acc.spread["accuracy_pct"]["ci_high"]
    assert f"42.0 [{low:.1f}-{high:.1f}]" in text and "42.0 ±" not in text


def test_at_100_columns_no_summary_line_is_wider(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    results = list(read_run(DATA / "stored-run-2x2.json").results.values())
    results[1].gates = [{"rule": "accuracy_ci_low_pct > self.accuracy_before_ci_high_pct when accuracy_n >= 100",
                         "where": "thresholds.yaml:21", "profile": "default", "status": "not evaluable",
                         "message": "lora: accuracy_ci_low_pct: not evaluable: accuracy_n = 40 (held-out answers "
                                    "scored for accuracy); the rule is decided only where accuracy_n >= 100; 10% of a "
                                    "data set's rows are held out (at most 256): a data set of 1000 rows or more gives "
                                    "it [thresholds.yaml:21, profile default]"}]
    lines = render_summary(results, {"pass": 200, "not evaluable": 1}, workers=2)
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    assert any(line.startswith("gates not evaluable") for line in lines)
    assert any("accuracy_n = 40" in line for line in lines)

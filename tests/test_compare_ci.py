"""`lorabench compare` for CI: the gated rows and the verdict by default, a Markdown summary for a pull-request
comment, a configuration change named as such, output that fits the terminal."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from lorabench.report import compare_output
from lorabench.commands.main import main
from lorabench.gates.compare import REGRESSED, compare_runs
from lorabench.storage.history import read_run
from lorabench.report.textsafe import markdown

DATA = Path(__file__).resolve().parent / "data"
# two unchanged `pytest bench/ -m qlora --steps 20` runs, one after the other on a 2-core machine shared with
# other work (2026-12-04)
PAIR = [DATA / "qlora-pair-1.json", DATA / "qlora-pair-2.json"]


def with_rank(run, case_id: str, rank: int):
    """A copy of a stored run in which ``case_id`` trained at another LoRA rank (adapter twice the size)."""
    changed = copy.deepcopy(run)
    record = changed.results[case_id]
    factor = rank / record.config["rank"]
    record.config["rank"] = rank
    for name in ("params_trainable", "trainable_mib", "adapter_mib"):
        if name in record.metrics:
            record.metrics[name] *= factor
    return changed


def test_markdown_on_two_unchanged_runs_fits_a_pull_request_comment(tmp_path):
    a, b = (read_run(p) for p in PAIR)
    comparison = compare_runs(a, b)
    out = tmp_path / "compare.md"
    compare_output.write_markdown(comparison, out)
    lines = out.read_text().splitlines()
    assert len(lines) < 40, "\n".join(lines)
    assert lines[2] in ("**No regression.**", f"**{len(comparison.regressions)} regression(s)**")
    # the figures that moved without gating are there, collapsed, one line per case
    text = out.read_text()
    if compare_output.informational_moves(comparison):
        assert "<details>" in text and "never gated" in text
    # --all puts every row in the collapsed section
    compare_output.write_markdown(comparison, out, show_all=True)
    assert len(out.read_text().splitlines()) > len(comparison.rows)


def test_the_terminal_shows_the_gated_rows_and_the_verdict_and_all_shows_the_rest():
    a, b = (read_run(p) for p in PAIR)
    comparison = compare_runs(a, b)
    short = compare_output.terminal(comparison, width=400)
    full = compare_output.terminal(comparison, show_all=True, width=400)
    assert short[-1] == "no regression" or short[-len(comparison.regressions) - 1].endswith("regression(s):")
    assert not any(" step_ms (ms) " in line for line in short)  # wall clock never gates: left out by default
    assert any(" step_ms (ms) " in line for line in full)
    assert any("informational row(s) that moved" in line and "--all shows every row" in line for line in short)
    assert len(full) > len(short) + len(comparison.rows) // 2


def test_a_rank_change_between_runs_is_named_as_a_configuration_change(tmp_path):
    a = read_run(DATA / "stored-run.json")
    b = with_rank(a, "lora", a.results["lora"].config["rank"] * 2)
    comparison = compare_runs(a, b)
    rank = f"rank {a.results['lora'].config['rank']} -> {b.results['lora'].config['rank']}"
    warning = next(w for w in comparison.warnings if w.startswith("lora: configuration changed"))
    assert rank in warning and "not two versions of the code" in warning
    assert comparison.changed_configs == {"lora": [rank]}
    regressions = [r for r in comparison.regressions if r.case_id == "lora"]
    assert regressions and all(r.status == REGRESSED for r in regressions)  # still a move CI must see
    text = "\n".join(compare_output.terminal(comparison, width=400))
    assert f"WARNING: {warning}" in text
    assert f"[configuration changed: {rank}]" in text
    out = tmp_path / "compare.md"
    compare_output.write_markdown(comparison, out)
    assert f"> **Warning:** {markdown(f'lora: configuration changed between the runs ({rank})')}" in out.read_text()
    # an unchanged case is not named
    assert not any(w.startswith("qlora_nf4_r8: configuration changed") for w in comparison.warnings)


def test_at_100_columns_no_compare_line_is_wider(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    data_a = json.loads((DATA / "stored-run-2x2.json").read_text())
    data_b = copy.deepcopy(data_a)
    for bench in data_b["benchmarks"]:  # every kind of row: regressions, informational moves, a config change
        info = bench["extra_info"]
        info["metrics"] = {k: v * 1.3 for k, v in info["metrics"].items()}
        info["config"]["rank"] = 32
    folder = tmp_path / "Linux-CPython-3.11-64bit"
    folder.mkdir()
    for number, data in ((1, data_a), (2, data_b)):
        (folder / f"{number:04d}_run.json").write_text(json.dumps(data))
    comparison = compare_runs(read_run(folder / "0001_run.json"), read_run(folder / "0002_run.json"))
    assert comparison.regressions and comparison.changed_configs
    for show_all in (False, True):
        lines = compare_output.terminal(comparison, show_all=show_all)
        assert max(map(len, lines)) <= 100, max(lines, key=len)
    # and through the command line, as CI runs it
    assert main(["compare", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any("regression(s):" in line for line in out)
    assert max(map(len, out)) <= 100, max(out, key=len)

"""Reliability, end to end: out of memory and budgets, timeouts, divergence, interrupted runs,
determinism, offline runs, and memory figures that do not depend on earlier cases."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabench.config import BenchConfig

ROOT = Path(__file__).resolve().parent.parent
NO_GATES = "version: 1\nprofiles: {}\n"


def bench(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False,
    )


def stored_runs(storage: Path) -> list[Path]:
    return sorted(storage.rglob("[0-9][0-9][0-9][0-9]_*.json"))


def results(path: Path) -> dict[str, dict]:
    return {b["extra_info"]["config_id"]: b["extra_info"] for b in json.loads(path.read_text())["benchmarks"]}


@pytest.fixture(scope="module")
def no_gates(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gates") / "none.yaml"
    path.write_text(NO_GATES)
    return path


# ----- determinism ---------------------------------------------------------------
@pytest.mark.integration
def test_same_seed_gives_identical_losses_on_the_cpu(tiny_llama, cpu):
    from lorabench.run.launch import InlineLauncher, resolve_case

    # QLoRA: bitsandbytes' NF4 kernels under the bf16 LoRA path, the most moving parts of one case
    config = BenchConfig(id="qlora", quant="nf4", double_quant=True, steps=4)
    case = resolve_case("finetune", case_id=config.id, model="tiny-llama", dataset="digit-reverse", device=cpu,
                        config=config, source=tiny_llama)
    runs = [InlineLauncher().run(case) for _ in range(2)]
    assert runs[0].status == runs[1].status == "ok"
    assert runs[0].loss_curve == runs[1].loss_curve  # bit for bit
    assert runs[0].metrics["eval_loss"] == runs[1].metrics["eval_loss"]


# ----- divergence -------------------------------------------------------------------
def test_divergence_fails_the_case_naming_the_step(no_gates):
    # lr 1e30 overflows bf16 activations within two steps (lr 1e6 only saturates the
    # weights: the loss sticks at ln(vocab) and stays finite, which is a quality gate's job).
    proc = bench("-k", "full", "--steps", "6", "--set", "lr=1e30", f"--thresholds={no_gates}",
                 "--benchmark-disable")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "full: diverged: training diverged: loss" in proc.stdout
    assert " at step " in proc.stdout and "(configuration full)" in proc.stdout


@pytest.mark.parametrize("losses, verdict", [
    ([2.0, 1.5, 1.2, 1.0, 0.9, 0.8], None),                             # learning
    ([2.0, 3.0, 4.1], "loss 4.1 is above 2 x the first step's 2"),     # climbs past the factor
    ([2.0, 2.5, 2.5, 2.5], "has not fallen below the first step's 2 over steps 1-4"),  # never falls
    ([2.0, 1.9, 2.5, 2.5], None),                                       # fell once inside the window
    ([2.0, 1.0, 1.0, 2.1, 2.2, 2.3, 2.4], "over steps 4-7"),            # learned, then climbed back
    ([0.0, 0.5, 0.5, 0.5], None),                                       # a zero start gives nothing to compare
])
def test_divergence_rule_names_the_rule_and_the_steps(losses, verdict):
    from lorabench.training.loop import DivergenceRule

    rule = DivergenceRule(factor=2.0, window=4)
    reasons = [rule.check(losses[:k]) for k in range(1, len(losses) + 1)]
    fired = [r for r in reasons if r]
    if verdict is None:
        assert not fired
    else:
        assert reasons[-1] and verdict in reasons[-1] and fired == [reasons[-1]]  # first fires at the last step
    assert DivergenceRule(factor=2.0, window=0).check([2.0, 2.5, 2.5, 2.5]) is None  # window 0: off


# ----- memory budget ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mid_size_checkpoint(tmp_path_factory) -> Path:
    """A 43 M-parameter random Llama: big enough that its weights, not the libraries, dominate memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorabench.models.zoo import build_tokenizer

    out = tmp_path_factory.mktemp("mid-llama")
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                         num_attention_heads=12, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_memory_budget_that_full_fine_tuning_exceeds_and_qlora_fits(mid_size_checkpoint, no_gates, tmp_path):
    # fp32 compute (this CPU has no fast bf16) and 40 rows (4 held out) keep it to seconds per case.
    # Unbudgeted on this model: full fine-tuning peaks near 750 MiB over its start, QLoRA NF4 near 170-260 MiB.
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"rev {n:04d}=", "completion": f"{n:04d}"[::-1]}) + "\n"
                            for n in range(1000, 1040)))
    out = tmp_path / "run.json"
    proc = bench("-k", "config[full] or config[qlora_nf4_r8]", f"--model={mid_size_checkpoint}", f"--dataset={data}",
                 "--set", "dtype=fp32", "--set", "batch_size=4", "--set", "seq_len=32", "--set", "warmup_steps=1",
                 "--steps", "3", "--memory-budget", "400MiB", f"--thresholds={no_gates}", f"--benchmark-json={out}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed, 1 skipped" in proc.stdout  # the case that does not fit is skipped, not failed
    assert "full: does_not_fit:" in proc.stdout and "over the --memory-budget of 400.0 MiB" in proc.stdout
    (qlora,) = results(out).values()  # pytest-benchmark stores only cases with timed rounds
    assert qlora["config_id"] == "qlora_nf4_r8"
    assert qlora["status"] == "ok" and qlora["metrics"]["peak_rss_delta_mib"] <= 400
    assert qlora["environment"]["memory_budget_mib"] == 400


# ----- timeouts ---------------------------------------------------------------
@pytest.mark.integration
def test_a_case_over_its_time_limit_fails_and_the_run_goes_on(no_gates, tmp_path):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("configs:\n  - id: hangs\n    steps: 100000\n  - id: quick\n    steps: 5\n")
    proc = bench(f"--matrix={matrix}", "--case-timeout", "25", f"--thresholds={no_gates}", "--benchmark-disable")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Timeout (>25.0s)" in proc.stdout
    # The limit fires while the case's fixture trains, so pytest counts it as an error.
    assert "1 passed, 1 error" in proc.stdout
    assert "hangs: timeout: stopped after the --case-timeout of 25 s" in proc.stdout


# ----- interrupted runs --------------------------------------------------------------
INTERRUPT_COMMON = ("--benchmark-autosave", "--isolate", "none")


@pytest.fixture(scope="module")
def earlier_history(no_gates, tmp_path_factory) -> Path:
    """A storage holding one finished autosaved run: the history an interrupted run must not damage."""
    storage = tmp_path_factory.mktemp("history")
    first = bench("-k", "config[lora]", "--steps", "5", f"--thresholds={no_gates}", *INTERRUPT_COMMON,
                  f"--benchmark-storage={storage}")
    assert first.returncode == 0, first.stdout[-3000:]
    return storage


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_run_leaves_earlier_history_whole(sig, no_gates, earlier_history, tmp_path):
    storage = tmp_path / "history"
    shutil.copytree(earlier_history, storage)
    (earlier,) = stored_runs(storage)
    earlier_bytes = earlier.read_bytes()

    # A run interrupted while its first case trains: the session saves only after its last case.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "-k", "config[lora] or qlora_nf4_r8", "--steps", "20", f"--thresholds={no_gates}",
         *INTERRUPT_COMMON, f"--benchmark-storage={storage}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "step 4/20" in line or time.monotonic() > deadline:  # progress is logged every 4 steps
            break
    proc.send_signal(sig)
    proc.communicate(timeout=120)

    assert earlier.read_bytes() == earlier_bytes
    assert stored_runs(storage) == [earlier]  # the interrupted run went to the unsaved folder, or nowhere
    assert not list(storage.rglob("*.partial"))


@pytest.mark.integration
def test_ctrl_c_to_the_process_group_mid_case_stores_no_run_and_compare_fail_passes(no_gates, earlier_history,
                                                                                   tmp_path):
    """Ctrl-C at a terminal reaches the whole process group: the pytest process and the case's own process."""
    from lorabench.storage.history import InterruptedRunError, read_run

    storage, scratch = tmp_path / "history", tmp_path / "tmp"
    shutil.copytree(earlier_history, storage)
    scratch.mkdir()
    (earlier,) = stored_runs(storage)
    shutil.copy(earlier, earlier.with_name("0002_again.json"))  # two earlier runs, for compare's default pair
    before = {p: p.read_bytes() for p in stored_runs(storage)}

    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "-k", "config[lora] or qlora_nf4_r8", "--steps", "20", f"--thresholds={no_gates}",
         "--benchmark-autosave", f"--benchmark-storage={storage}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "TMPDIR": str(scratch), "COLUMNS": "1000"},  # the unsaved folder under the temporary one
    )
    seen, deadline = [], time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        if "step 8/20" in line or time.monotonic() > deadline:  # past warm-up: timed rounds are being recorded
            break
    os.killpg(proc.pid, signal.SIGINT)
    out = "".join(seen) + proc.communicate(timeout=120)[0]

    assert "step 8/20" in out, out[-3000:]
    assert {p: p.read_bytes() for p in stored_runs(storage)} == before, out[-3000:]  # nothing stored, nothing changed
    assert "RESULTS NOT SAVED to --benchmark-storage" in out and "the run was interrupted" in out, out[-3000:]
    kept = Path(re.search(r"the run's results were written to (\S+) instead", out).group(1))
    assert kept.parent == scratch / "lorabench-unsaved"
    with pytest.raises(InterruptedRunError):
        read_run(kept)
    compare = subprocess.run([sys.executable, "-m", "lorabench", "compare", "--storage", str(storage), "--fail"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "no regression" in compare.stdout
    assert not list(tmp_path.rglob("*.partial"))


def test_a_save_that_dies_half_way_leaves_no_result_file(tmp_path, monkeypatch):
    import logging

    from lorabench.storage.atomic import AtomicFileStorage

    storage = AtomicFileStorage(tmp_path, logging.getLogger("test"))
    storage.save({"benchmarks": [], "n": 1}, "first")
    (first,) = stored_runs(tmp_path)

    def die(*args):
        raise KeyboardInterrupt  # what a signal would raise inside the write

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        storage.save({"benchmarks": [], "n": 2}, "second")
    assert stored_runs(tmp_path) == [first]  # the half-written run is not a result
    assert json.loads(first.read_text())["n"] == 1
    assert storage._next_num == "0002"  # and it does not disturb the numbering


# ----- preflight, through pytest ------------------------------------------------------------
def test_preflight_stops_the_run_at_collection_and_checks_only_the_selected_cases(no_gates, tmp_path):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("configs:\n  - {id: good}\n  - {id: cut, seq_len: 1}\n")
    common = (f"--matrix={matrix}", f"--thresholds={no_gates}", "--collect-only", "-q")
    refused = bench(*common)
    assert refused.returncode == 4, refused.stdout[-2000:]
    assert "configuration 'cut' on --model tiny-llama, --dataset digit-reverse: seq_len=1" in refused.stderr
    assert bench(*common, "-k", "good").returncode == 0  # the deselected case is not checked
    (tmp_path / "history").write_text("a file")
    storage = bench(*common, "-k", "good", "--benchmark-autosave", f"--benchmark-storage={tmp_path / 'history'}")
    assert storage.returncode == 4
    assert f"--benchmark-storage {tmp_path / 'history'}" in storage.stderr and "cannot write there" in storage.stderr


# ----- saving that fails ----------------------------------------------------------------
def test_a_run_whose_storage_breaks_before_saving_is_written_elsewhere_and_summarised(no_gates, tmp_path):
    from lorabench.matrix import DEFAULT_CONFIGS

    case = next(c.id for c in DEFAULT_CONFIGS if c.method == "lora" and not c.quantized)
    storage, scratch, data = tmp_path / "history", tmp_path / "tmp", tmp_path / "small.jsonl"
    scratch.mkdir()
    # 40 rows (4 held out), fp32, batch 4: the case's own evaluation and adapter check take seconds
    data.write_text("".join(json.dumps({"prompt": f"rev {n:04d}=", "completion": f"{n:04d}"[::-1]}) + "\n"
                            for n in range(1000, 1040)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", f"{ROOT / 'bench' / 'test_finetune.py'}::test_finetune[{case}]",
         "-p", "no:cacheprovider", "--rootdir", str(ROOT), "--steps", "5", f"--dataset={data}", "--set", "dtype=fp32",
         "--set", "batch_size=4", f"--thresholds={no_gates}", "--isolate", "none", "--benchmark-autosave",
         f"--benchmark-storage={storage}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(scratch)},  # the fallback goes under the temporary directory
    )
    seen = []
    for line in proc.stdout:  # training has begun, so the start-up checks of the storage are behind us
        seen.append(line)
        if "step 1/5" in line:
            break
    assert storage.is_dir(), "".join(seen)[-3000:]
    shutil.rmtree(storage)
    storage.write_text("this path is now a file")
    out = "".join(seen) + proc.communicate(timeout=600)[0]

    assert proc.returncode == 1, out[-3000:]
    assert f"RESULTS NOT SAVED to --benchmark-storage {storage}: a component of the path is a file" in out
    fallback = Path(re.search(r"the run's results were written to (\S+) instead", out).group(1))
    assert fallback.parent == scratch / "lorabench-unsaved"
    (saved,) = json.loads(fallback.read_text())["benchmarks"]
    assert saved["extra_info"]["config_id"] == case and saved["extra_info"]["status"] == "ok"
    assert saved["stats"]["rounds"] == 5 - 3  # the timed steps after the 3 warm-up steps
    assert "lorabench summary" in out and re.search(rf"^{case}\s+ok\s", out, flags=re.M)
    assert not list(tmp_path.rglob("*.partial"))


def test_a_save_on_a_full_disk_leaves_no_partial_file_and_goes_to_the_fallback(tmp_path, monkeypatch):
    import errno
    import logging
    import tempfile

    from lorabench.storage import atomic as storage_module
    from lorabench.storage.atomic import AtomicFileStorage, make_atomic

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    history = tmp_path / "history"
    store = AtomicFileStorage(history, logging.getLogger("test"))
    failures = []
    store.__class__ = storage_module.FileStorage
    make_atomic(store, failures)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 1:  # the storage's write; the fallback's goes through
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.save({"benchmarks": [], "n": 1}, "run")
    assert not list(tmp_path.rglob("*.partial")) and not stored_runs(history)
    (failure,) = failures
    assert failure.reason == "no space left on the device"
    assert failure.fallback.parent == tmp_path / "tmp" / "lorabench-unsaved" and failure.fallback.name.endswith("0001_run.json")
    assert json.loads(failure.fallback.read_text())["n"] == 1
    assert "the run's results were written to" in "\n".join(failure.lines())


def test_benchmark_json_that_cannot_be_written_goes_to_the_fallback(tmp_path, monkeypatch):
    import logging
    import tempfile
    from types import SimpleNamespace

    from lorabench.storage.atomic import protect_json_output

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "out").write_text("a file, not a directory")
    session = SimpleNamespace(json=tmp_path / "out" / "run.json", logger=SimpleNamespace(error=logging.error, info=print))
    failures = []
    protect_json_output(session, failures)
    session.save_json({"benchmarks": [1]})
    (failure,) = failures
    assert failure.target == f"--benchmark-json {tmp_path / 'out' / 'run.json'}"
    assert json.loads(failure.fallback.read_text()) == {"benchmarks": [1]}


# ----- reports take any string ------------------------------------------------------------
# mathtext matplotlib cannot parse, HTML, a cell break, a code span, 300 non-ASCII characters
ODD = "$x^^2$ <b>x</b> | `tick` " + "\u00e9\u4e2d" * 150


def test_a_report_of_names_with_mathtext_html_pipes_backticks_and_long_unicode(tmp_path):
    from lorabench.storage.history import StoredRun
    from lorabench.report.pages import write_report
    from lorabench.result import CaseResult
    from lorabench.report.summary import render_summary

    results = []
    for i, (config_id, rank) in enumerate((("base " + ODD, 8), ("lora " + ODD, 16))):
        r = CaseResult(case_id=f"c{i}", config_id=config_id, model="/models/" + ODD, dataset="data " + ODD + ".jsonl",
                       device="cpu", config={"method": "lora", "rank": rank, "quant": None})
        r.metrics.update({"peak_rss_delta_mib": 100.0 + i, "weights_mib": 6.0, "step_ms": 100.0, "train_s": 3.0 + i,
                          "tokens_per_s": 2000.0, "eval_loss": 0.5 - 0.1 * i, "train_loss_final": 0.6})
        r.loss_curve = [3.0, 2.0]
        results.append(r)
    run = StoredRun(path=Path("0001_x.json"), number=1, name=ODD, datetime=ODD, commit={"id": ODD, "branch": ODD},
                    machine={"cpu": ODD}, results={r.case_id: r for r in results})

    written = write_report(run, tmp_path)
    pngs = sorted(p.stem for p in written if p.suffix == ".png")
    # every plot these records allow (loss curves included: the odd names are their legend), none empty
    assert pngs == ["loss_curves", "memory_vs_time", "pareto_memory_quality", "quality_vs_rank", "quality_vs_time"], pngs
    assert all(p.stat().st_size for p in written)
    md = (tmp_path / "summary.md").read_text()
    assert "<b>" not in md and "&lt;b&gt;" in md  # no raw HTML reaches a Markdown renderer
    assert "\\$x^^2\\$" in md and "$x" not in md.replace("\\$", "")  # no math span
    assert "\\`tick\\`" in md
    width, rows = None, 0
    for line in md.splitlines():  # every table row keeps its header's column count: no | splits a cell
        cells = len(re.findall(r"(?<!\\)\|", line))
        if not line.startswith("|"):
            width = None
        elif width is None:
            width = cells
        else:
            assert cells == width, line
            rows += 1
    assert rows >= 6
    html = (tmp_path / "summary.html").read_text()
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert any("base $x^^2$" in line for line in render_summary(results))  # the terminal shows names as they are


# ----- offline -----------------------------------------------------------------------
@pytest.mark.integration
def test_the_embedded_default_makes_no_network_attempt(tmp_path, no_gates):
    log = tmp_path / "network.log"
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "offline"), os.environ.get("PYTHONPATH", "")]),
           "LORABENCH_NETWORK_LOG": str(log)}
    env.update({k: "" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ})
    proc = bench("-k", "qlora_nf4_r8", "--steps", "5", f"--thresholds={no_gates}", "--benchmark-disable", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not log.exists(), log.read_text()

    proc = bench("--model", "no-such-org/no-such-model", f"--thresholds={no_gates}", env=env)
    assert proc.returncode == 4
    assert "not in the local Hugging Face cache" in proc.stderr
    assert not log.exists(), log.read_text()


# ----- isolation ------------------------------------------------------------------------
@pytest.mark.integration
def test_a_cases_peak_memory_does_not_depend_on_the_cases_before_it(no_gates, tmp_path):
    def peak(*select: str) -> float:
        out = tmp_path / f"{len(select)}.json"
        # the peak comes in the first step (activations, gradients, optimizer state all exist by then)
        proc = bench(*select, "--steps", "4", f"--thresholds={no_gates}", f"--benchmark-json={out}")
        assert proc.returncode == 0, proc.stdout[-3000:]
        return results(out)["lora"]["metrics"]["peak_rss_delta_mib"]

    alone = peak("-k", "config[lora]")
    matrix = tmp_path / "others-first.yaml"
    # the largest case first (full fine-tuning), then a quantized one
    matrix.write_text("configs:\n  - {id: full, method: full}\n  - {id: lora_int8, quant: int8}\n"
                      "  - {id: lora}\n")
    after_others = peak(f"--matrix={matrix}")
    assert abs(after_others - alone) / alone <= 0.05, (alone, after_others)

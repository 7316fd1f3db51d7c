"""Reliability, end to end: out of memory and budgets, timeouts, divergence, interrupted runs,
determinism, offline runs, and memory figures that do not depend on earlier cases."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabench.config import BenchConfig
from lorabench.matrix import Case
from lorabench.runner import CaseRun, measure, tokenize_task

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
def test_same_seed_gives_identical_losses_on_the_cpu(tiny_llama, cpu):
    from lorabench.data import load_task_data
    from lorabench.models import load_tokenizer

    task, tokenizer = load_task_data("digit-reverse"), load_tokenizer(tiny_llama)
    # QLoRA: bitsandbytes' NF4 kernels under the bf16 LoRA path, the most moving parts of one case
    config = BenchConfig(id="qlora", quant="nf4", double_quant=True, steps=4)
    runs = [
        measure(CaseRun(Case("tiny-llama", "digit-reverse", config), case_id=config.id, source=tiny_llama,
                        tokens_for=lambda c: tokenize_task(task, tokenizer, c.seq_len), device=cpu))
        for _ in range(2)
    ]
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
    assert "training diverged: loss is" in proc.stdout
    assert " at step " in proc.stdout and "(configuration full)" in proc.stdout


# ----- memory budget ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mid_size_checkpoint(tmp_path_factory) -> Path:
    """A 43 M-parameter random Llama: big enough that its weights, not the libraries, dominate memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorabench.zoo import build_tokenizer

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
    proc = bench("-k", "full or qlora_nf4_r8", f"--model={mid_size_checkpoint}", f"--dataset={data}",
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
    first = bench("-k", "lora", "--steps", "5", f"--thresholds={no_gates}", *INTERRUPT_COMMON,
                  f"--benchmark-storage={storage}")
    assert first.returncode == 0, first.stdout[-3000:]
    return storage


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_run_leaves_earlier_history_whole(sig, no_gates, earlier_history, tmp_path):
    storage = tmp_path / "history"
    shutil.copytree(earlier_history, storage)
    (earlier,) = stored_runs(storage)
    earlier_bytes = earlier.read_bytes()

    # A run interrupted while its first case trains: the session saves only after its last case.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "-k", "lora or qlora_nf4_r8", "--steps", "20", f"--thresholds={no_gates}",
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
    for path in stored_runs(storage):  # whatever the interrupted run saved is whole JSON
        json.loads(path.read_text())
    assert not list(storage.rglob("*.partial"))


def test_a_save_that_dies_half_way_leaves_no_result_file(tmp_path, monkeypatch):
    import logging

    from lorabench.storage import AtomicFileStorage

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


# ----- offline -----------------------------------------------------------------------
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
def test_a_cases_peak_memory_does_not_depend_on_the_cases_before_it(no_gates, tmp_path):
    def peak(*select: str) -> float:
        out = tmp_path / f"{len(select)}.json"
        # the peak comes in the first step (activations, gradients, optimizer state all exist by then)
        proc = bench(*select, "--steps", "4", f"--thresholds={no_gates}", f"--benchmark-json={out}")
        assert proc.returncode == 0, proc.stdout[-3000:]
        return results(out)["lora"]["metrics"]["peak_rss_delta_mib"]

    alone = peak("-k", "lora")
    matrix = tmp_path / "others-first.yaml"
    # the largest case first (full fine-tuning), then a quantized one
    matrix.write_text("configs:\n  - {id: full, method: full}\n  - {id: lora_int8, quant: int8}\n"
                      "  - {id: lora}\n")
    after_others = peak(f"--matrix={matrix}")
    assert abs(after_others - alone) / alone <= 0.05, (alone, after_others)

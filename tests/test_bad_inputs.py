"""Every bad input a user can give gets a clear answer, before any training where it can.

Each entry of ``CATALOG`` goes through the same code a bench run does. Start-up inputs run a real
``pytest bench/test_finetune.py --collect-only`` with the installed plugin (its ``pytest11`` entry
point), in this process (``pytest.main``), so every hook that reads or checks an input runs, the
end-of-collection plan line included; a few rows, one per hook that can refuse, also run as a
``pytest`` subprocess without ``--collect-only`` to show both paths answer alike
(:func:`test_a_real_pytest_run_answers_as_the_in_process_one`). A case run through the plugin
answers the rows where the case itself decides (``--case-timeout``); divergence rows train the first
LoRA case in this process; the command line rows run ``python -m lorabench compare`` / ``report``.
Some inputs are not errors at all but were once mishandled (a file literally named ``f*.jsonl``);
their row says how they are read. The table in docs/bad-inputs.md is generated from this catalog,
and a test keeps it current:

    python tests/test_bad_inputs.py > docs/bad-inputs.md
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorabench.pytest_plugin.session import open_session  # noqa: E402

GATES_HEAD = "version: 1\nprofiles:\n  default:\n"
STARTUP, ACCEPTED, TRAINING, COMMAND = "refused at start-up", "read as given", "stopped in training", "command"
RUN = "recorded by the run"  # a case run through the plugin, which records the status shown
BENCH_FILE = ROOT / "bench" / "test_finetune.py"
# the plugin's option for each open_session argument a row gives
PYTEST_OPTIONS = {"matrix_file": "--matrix", "models": "--model", "datasets": "--dataset", "overrides": "--set",
                  "steps": "--steps", "device": "--device", "thresholds": "--thresholds", "report_to": "--report-to",
                  "isolate": "--isolate", "memory_budget": "--memory-budget", "case_timeout_s": "--case-timeout",
                  "seeds": "--seeds", "cpu_threads": "--cpu-threads"}
# an in-process run leaves out what only costs time there: the cache, and the forced garbage collections of
# the unraisable- and thread-exception plugins (0.4 s each with torch loaded); output goes to a buffer (-s)
IN_PROCESS = ("-s", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "no:threadexception")
# 306 bytes of nested aliases that stand for 10^9 strings
ALIAS_BOMB = ("a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
              "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
              "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
              "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]\n")
SAFE_NAME = "m-$x^^2$ <b>|`q`| " + "é" * 300  # bad mathtext, HTML, a Markdown cell break, a code span, 300 non-ASCII


@dataclass(frozen=True)
class BadInput:
    """One input: the files it writes, what it passes, the words its answer must hold.

    Args:
        options: open_session's arguments, given to pytest as the plugin's options (PYTEST_OPTIONS).
        files: path -> text or bytes, or a function that writes the path.
        stage: STARTUP (must be refused), ACCEPTED (must be read as given), RUN (the selected case runs
            through the plugin), TRAINING (the first LoRA case runs in this process), or COMMAND
            (``argv`` runs through ``python -m lorabench``).
        outputs: directories the run would write (``check_outputs``), ``{d}`` standing for the work directory.
        prepare: a context manager set up around the trigger (a read-only directory, a fake full disk, ...).
        describe: for ACCEPTED inputs, what the session read, in words.
        pytest_args: more of pytest's arguments, as typed (``-k``, ``--shard -1/2``).
        env: environment variables set for the run.
    """

    name: str
    options: dict = field(default_factory=dict)
    files: dict[str, str | bytes | Callable[[Path], None]] = field(default_factory=dict)
    expect: tuple[str, ...] = ()
    stage: str = STARTUP
    outputs: dict = field(default_factory=dict)
    prepare: Callable[[Path], contextlib.AbstractContextManager] | None = None
    describe: Callable | None = None
    argv: tuple[str, ...] = ()
    pytest_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    stage: str
    message: str
    seconds: float
    exit: int | None = None  # the command's exit status, where a command ran


# ----- files the catalog writes ----------------------------------------------------------------
def _causal_config(**extra) -> str:
    return json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                       "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 16,
                       **extra})


def _safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"model.embed_tokens.weight": torch.zeros(16, 8)})


# every tensor of the model _causal_config() describes but the output layer (tied to the embedding)
TINY_LLAMA_TENSORS = {
    "model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
    **{f"model.layers.0.self_attn.{p}_proj.weight": (8, 8) for p in "qkvo"},
    "model.layers.0.mlp.gate_proj.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.0.mlp.down_proj.weight": (8, 16),
    "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
}


def _tensors(shapes: dict[str, tuple[int, ...]]) -> bytes:
    import torch
    from safetensors.torch import save

    return save({name: torch.zeros(shape) for name, shape in shapes.items()})


def save_tokenizer(directory: Path) -> None:
    """The zoo's character tokenizer, saved as a checkpoint's tokenizer files."""
    from lorabench.models.zoo import build_tokenizer

    build_tokenizer().save_pretrained(directory)


def _number_rows(n: int) -> str:
    """Rows whose prompt and completion are JSON numbers: ``{"prompt": 100, "completion": 200}``."""
    return "".join(json.dumps({"prompt": k, "completion": 2 * k}) + "\n" for k in range(100, 100 + n))


def _matrix_of(count: int) -> str:
    """A matrix file of ``count`` LoRA configurations, every field written out (no aliases)."""
    return "configs:\n" + "".join(f"  - id: c{i}\n    method: lora\n    rank: {8 * (1 + i % 4)}\n    alpha: 16\n"
                                   f"    lr: 0.0002\n    target_modules: [q_proj, v_proj]\n" for i in range(count))


def _rows(n: int, prompt: str = "q") -> str:
    return "".join(json.dumps({"prompt": f"{prompt}{i}", "completion": "ab"}) + "\n" for i in range(n))


def _reverse_rows(n: int) -> str:
    """Rows of the embedded task's kind, ``rev 1234=`` -> ``4321``."""
    return "".join(json.dumps({"prompt": f"rev {k:04d}=", "completion": f"{k:04d}"[::-1]}) + "\n"
                   for k in range(1000, 1000 + 7 * n, 7))


def _stored_run(number: int, *cases: tuple[str, str, str | None], model: str = "tiny-llama") -> tuple[str, str]:
    """A pytest-benchmark run file holding lorabench results: (config id, status, error) per case."""
    from lorabench.result import CaseResult

    benchmarks = []
    for config_id, status, error in cases:
        r = CaseResult(case_id=config_id, config_id=config_id, model=model, dataset="digit-reverse", device="cpu",
                       config={"method": "lora", "rank": 16, "quant": "none", "warmup_steps": 1}, status=status,
                       error=error)
        if status == "ok":
            r.metrics.update({"peak_rss_delta_mib": 100.0, "weights_mib": 6.0, "step_ms": 100.0, "train_s": 3.0,
                              "tokens_per_s": 2000.0, "eval_loss": 0.5, "train_loss_final": 0.6})
        r.loss_curve = [3.0, 2.0, 1.0]
        benchmarks.append({"name": f"test_finetune[{config_id}]", "stats": {}, "extra_info": r.to_extra_info()})
    path = f"history/Linux-CPython-3.11-64bit/{number:04d}_run{number}.json"
    return path, json.dumps({"machine_info": {"cpu": "x86_64"}, "commit_info": {"id": f"c{number}"},
                             "datetime": f"2026-11-2{number}T00:00:00", "benchmarks": benchmarks})


DIVERGED = ("lora", "diverged", "training diverged: loss has not fallen below the first step's 2.492 over steps "
                                "1-10 (divergence_window=10) at step 10 (configuration lora)")
HISTORY = dict([_stored_run(1, ("lora", "ok", None)), _stored_run(2, ("lora", "ok", None)),
                _stored_run(3, ("lora", "ok", None), DIVERGED)])


# ----- conditions the catalog sets up ----------------------------------------------------------
@contextlib.contextmanager
def read_only_dir(workdir: Path) -> Iterator[None]:
    """``<d>/ro``, a directory nobody may write: mode 555, and the immutable flag where root ignores modes."""
    path = workdir / "ro"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK):  # root
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if not immutable:
            path.chmod(0o755)
            pytest.skip("no way to make a directory read-only for this user (root without chattr)")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


@contextlib.contextmanager
def symlink_loop(workdir: Path) -> Iterator[None]:
    (workdir / "loop").symlink_to(workdir / "loop")
    yield


@contextlib.contextmanager
def home_is_workdir(workdir: Path) -> Iterator[None]:
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(workdir)
    try:
        yield
    finally:
        os.environ["HOME"] = saved or ""


@contextlib.contextmanager
def full_disk(workdir: Path) -> Iterator[None]:
    """shutil.disk_usage reports 10 MiB free (filling a real disk is not a test's business)."""
    real = shutil.disk_usage
    shutil.disk_usage = lambda path: real(path)._replace(free=10 * 2**20)
    try:
        yield
    finally:
        shutil.disk_usage = real


@contextlib.contextmanager
def cuda_without_bf16(workdir: Path) -> Iterator[None]:
    import torch

    saved = torch.cuda.is_available, torch.cuda.is_bf16_supported, torch.cuda.get_device_name
    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: False
    torch.cuda.get_device_name = lambda *a, **k: "Tesla T4"
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.is_bf16_supported, torch.cuda.get_device_name = saved


def rows_read(session, workdir: Path) -> str:
    task = session.task(session.matrix.datasets[0])
    texts = sorted(r["prompt"] for r in task.train) + sorted(r["prompt"] for r in task.eval)
    return f"read {len(texts)} rows ({', '.join(sorted(texts))}) from {task.name}"


def rows_as_text(session, workdir: Path) -> str:
    task = session.task(session.matrix.datasets[0])
    row = min((r for split in (task.train, task.eval) for r in split), key=lambda r: r["prompt"])
    return (f"read {len(task.train) + len(task.eval)} rows as text, e.g. prompt {row['prompt']!r} -> completion "
            f"{row['completion']!r}")


def configurations_read(session, workdir: Path) -> str:
    return f"read {len(session.matrix.configs):,} configurations, {len(session.matrix.cases()):,} cases collected"


def notices_given(session, workdir: Path) -> str:
    return "accepted with a warning at start-up: " + "; ".join(session.notices)


def model_checked(session, workdir: Path) -> str:
    source = session.model_source(session.matrix.models[0])
    return f"checkpoint found at {source.path}"


CATALOG = [
    # thresholds.yaml
    BadInput("thresholds: not valid YAML", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*': [loss_drop >= 0.1\n"}, ("gates.yaml:5", "not valid YAML")),
    BadInput("thresholds: unknown metric", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*':\n      - peak_vram <= 3\n"}, ("gates.yaml:5", "unknown metric 'peak_vram'")),
    BadInput("thresholds: unknown configuration", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    qlora_nf5:\n      - loss_drop >= 0.1\n"},
             ("gates.yaml:4", "unknown configuration 'qlora_nf5'", "qlora_nf4")),
    BadInput("thresholds: bound is not a number", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*':\n      - step_ms <= fast\n"}, ("gates.yaml:5", "step_ms <= fast")),
    BadInput("thresholds: bound not finite (-1e999)", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*':\n      - loss_drop >= -1e999\n"},
             ("gates.yaml:5", "the bound -1e999 is not a finite number")),
    BadInput("thresholds: rules not a list", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*': loss_drop >= 0.1\n"}, ("gates.yaml:4", "must be a list")),
    BadInput("thresholds: a rule that is a mapping", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*':\n      - {loss_drop: 0.1}\n"},
             ("gates.yaml:5", "a rule must be a string", "got a mapping")),
    BadInput("thresholds: contradictory bounds", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*':\n      - step_ms <= 10\n      - step_ms >= 20\n"},
             ("gates.yaml", "step_ms", "contradict")),
    BadInput("thresholds: contradictory relative bounds", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    qlora_nf4:\n      - weights_mib <= 0.5 * lora.weights_mib\n"
                                         "      - weights_mib >= 0.8 * lora.weights_mib\n"},
             ("gates.yaml:5", "contradicts", "for any positive lora.weights_mib")),
    BadInput("thresholds: a rule comparing two units", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*':\n      - peak_rss_delta_mib <= 1.0 * self.step_ms\n"},
             ("gates.yaml:5", "peak_rss_delta_mib (MiB) with step_ms (ms)", "share a unit")),
    BadInput("thresholds: unknown top-level key", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 1\ngates: {}\nprofiles: {}\n"}, ("gates.yaml:2", "unknown key 'gates'")),
    BadInput("thresholds: a key twice", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 1\nprofiles: {}\nprofiles: {default: {'*': [loss_drop >= 0.1]}}\n"},
             ("gates.yaml:3", "key 'profiles' repeats (first at line 2)")),
    BadInput("thresholds: a 306-byte alias bomb", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": ALIAS_BOMB}, ("gates.yaml:", "aliases expand the document by more than 100,000 nodes")),
    BadInput("thresholds: unknown profile", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 1\nprofiles:\n  tpu:\n    '*':\n      - loss_drop >= 0.1\n"}, ("gates.yaml:3", "tpu")),
    BadInput("thresholds: wrong version", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 2\nprofiles: {}\n"}, ("gates.yaml:1", "version must be 1")),
    BadInput("thresholds: a Python object tag (unsafe YAML)", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 1\nprofiles: !!python/object/apply:os.system ['echo owned']\n"},
             ("gates.yaml:2", "python/object/apply", "not allowed")),
    BadInput("thresholds: file missing", {"thresholds": "{d}/nope.yaml"}, {}, ("nope.yaml", "not found")),
    BadInput("thresholds: empty string (--thresholds '')", {"thresholds": ""}, {}, ("--thresholds ''", "empty")),
    BadInput("thresholds: a directory", {"thresholds": "{d}/gates"}, {"gates/x": "x"},
             ("--thresholds <dir>/gates", "a directory, not a file")),
    # matrix files
    BadInput("matrix: unknown field", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n    rnak: 8\n"}, ("m.yaml: configs[0]", "unknown field(s) 'rnak'", "rank")),
    BadInput("matrix: rank 0", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n    rank: 0\n"}, ("m.yaml: configs[0]", "rank=0 must be at least 1")),
    BadInput("matrix: negative steps", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n    steps: -5\n"}, ("m.yaml: configs[0]", "steps=-5 must be at least 1")),
    BadInput("matrix: 4-bit and 8-bit at once", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n    quant: [nf4, int8]\n"}, ("m.yaml: configs[0]", "quant", "not both")),
    BadInput("matrix: full fine-tuning of a quantized base", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n    method: full\n    quant: nf4\n"}, ("method='full'", "use method='lora'")),
    BadInput("matrix: double quantization on int8", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n    quant: int8\n    double_quant: true\n"}, ("double_quant=true", "nf4 or fp4")),
    BadInput("matrix: unknown dtype", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n    dtype: fp8\n"}, ("dtype='fp8'", "bf16, fp16, fp32")),
    BadInput("matrix: no measured step", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n    steps: 3\n    warmup_steps: 3\n"}, ("steps=3 must exceed warmup_steps=3",)),
    BadInput("matrix: unknown top-level key", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "model: tiny-llama\n"}, ("m.yaml", "unknown key(s) ['model']", "models")),
    BadInput("matrix: the same id twice", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n  - id: a\n"}, ("m.yaml", "'a' appears twice")),
    BadInput("matrix: 'configs:' twice (the second would replace the first)", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\nconfigs:\n  - id: b\n"}, ("m.yaml (line 3)", "key 'configs' repeats (first at line 1)")),
    BadInput("matrix: 'rank: 8' and 'rank: 64' in one configuration", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs:\n  - id: a\n    rank: 8\n    rank: 64\n"}, ("m.yaml (line 4)", "key 'rank' repeats (first at line 3)")),
    BadInput("matrix: a 306-byte alias bomb", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": ALIAS_BOMB}, ("m.yaml", "aliases expand the document by more than 100,000 nodes")),
    BadInput("matrix: a Python object tag (unsafe YAML)", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs: !!python/object/apply:os.system ['echo owned']\n"}, ("m.yaml (line 1)", "not allowed")),
    BadInput("matrix: file missing", {"matrix_file": "{d}/nope.yaml"}, {}, ("nope.yaml", "not found")),
    BadInput("matrix: empty string (--matrix '')", {"matrix_file": ""}, {}, ("--matrix ''", "empty")),
    BadInput("compute dtype the device lacks (--set dtype=bf16 on a CUDA card without it)",
             {"device": "cuda", "overrides": ["dtype=bf16"]}, {},
             ("dtype='bf16' is not supported", "dtype=fp16"), prepare=cuda_without_bf16),
    # command line
    BadInput("--set without '='", {"overrides": ["rank"]}, {}, ("--set 'rank'", "KEY=VALUE")),
    BadInput("--set unknown key", {"overrides": ["rnak=8"]}, {}, ("unknown key 'rnak'", "rank")),
    BadInput("--set empty value (--set lr=)", {"overrides": ["lr="]}, {}, ("--set 'lr='", "empty value")),
    BadInput("--set empty string (--set '')", {"overrides": [""]}, {}, ("--set ''", "empty")),
    BadInput("--set lr not a number", {"overrides": ["lr=fast"]}, {}, ("lr='fast' is not a number",)),
    BadInput("--set lr=nan", {"overrides": ["lr=nan"]}, {}, ("lr=nan must be a finite number",)),
    BadInput("--set optimizer unknown", {"overrides": ["optimizer=sgd"]}, {}, ("optimizer='sgd'", "paged_adamw_8bit")),
    BadInput("--set seed=4294967296 (past numpy's seed range)", {"overrides": ["seed=4294967296"]}, {},
             ("seed=4294967296 is out of range", "0 to 4294967295")),
    BadInput("--set a YAML value with a key twice", {"overrides": ["target_modules={a: 1, a: 2}"]}, {},
             ("--set 'target_modules={a: 1, a: 2}'", "key 'a' repeats")),
    BadInput("--set target_modules=[no_such_module]", {"overrides": ["target_modules=[no_such_module]"]}, {},
             ("target_modules names 'no_such_module', which is no module of the model", "q_proj")),
    BadInput("--set target_modules=[layers] (a container, not a layer)", {"overrides": ["target_modules=[layers]"]}, {},
             ("'layers', a ModuleList, which LoRA cannot adapt",)),
    BadInput("--set seq_len=1", {"overrides": ["seq_len=1"]}, {},
             ("seq_len=1 leaves no completion token in any training row", "--set seq_len=10 or more")),
    BadInput("--set divergence_factor=1", {"overrides": ["divergence_factor=1"]}, {},
             ("divergence_factor=1 must be above 1",)),
    BadInput("--steps 0", {"steps": 0}, {}, ("steps=0 must be at least 1",)),
    BadInput("--device cuda where there is none", {"device": "cuda"}, {}, ("--device cuda", "no CUDA device")),
    BadInput("--device unknown", {"device": "tpu"}, {}, ("--device 'tpu'", "auto, cpu, cuda")),
    BadInput("--device empty string", {"device": ""}, {}, ("--device ''", "empty")),
    BadInput("--memory-budget without a unit we know", {"memory_budget": "6 gigs"}, {}, ("--memory-budget '6 gigs'", "6GiB")),
    BadInput("--memory-budget 0", {"memory_budget": "0GiB"}, {}, ("more than 0 bytes",)),
    BadInput("--case-timeout negative", {"case_timeout_s": -1.0}, {}, ("--case-timeout -1", "positive")),
    BadInput("--case-timeout inf", {"case_timeout_s": float("inf")}, {}, ("--case-timeout inf", "finite positive")),
    BadInput("--case-timeout nan", {"case_timeout_s": float("nan")}, {}, ("--case-timeout nan", "finite positive")),
    BadInput("--cpu-threads 0", {"cpu_threads": "0"}, {}, ("--cpu-threads '0'", "1 or more")),
    BadInput("--cpu-threads not a number", {"cpu_threads": "many"}, {}, ("--cpu-threads 'many'", "auto or a whole number")),
    BadInput("--report-to tensorboard with a 300-character configuration id",
             {"matrix_file": "{d}/m.yaml", "report_to": "tensorboard"}, {"m.yaml": "configs:\n  - id: " + "a" * 300 + "\n"},
             ("case id aaaa", "(300 bytes)", "limited to 255 bytes")),
    # where a run writes
    BadInput("--benchmark-storage a read-only directory", {}, {}, ("--benchmark-storage <dir>/ro", "read-only or not permitted"),
             outputs={"storage": "{d}/ro"}, prepare=read_only_dir),
    BadInput("--benchmark-storage a path that is a file", {}, {"history": "x"},
             ("--benchmark-storage <dir>/history/", "a component of the path is a file"),
             outputs={"storage": "{d}/history"}),
    BadInput("--benchmark-storage on a full disk", {}, {},
             ("--benchmark-storage <dir>/history", "10.0 MiB free", "the run's outputs need up to"),
             outputs={"storage": "{d}/history"}, prepare=full_disk),
    BadInput("--benchmark-json in a directory that is a file", {}, {"out": "x"},
             ("--benchmark-json <dir>/out/run.json: its directory <dir>/out", "a file stands where the directory should be"),
             outputs={"json_path": "{d}/out/run.json"}),
    BadInput("--benchmark-json a directory", {}, {"out/x": "x"},
             ("--benchmark-json <dir>/out: a directory, not a file",), outputs={"json_path": "{d}/out"}),
    BadInput("--seeds 0", {"seeds": "0"}, {}, ("--seeds '0'", "a count from 1 to 100")),
    BadInput("--seeds with a repeated seed", {"seeds": "7,7"}, {}, ("--seeds '7,7'", "seed 7 appears twice")),
    # models
    BadInput("--model path missing", {"models": ["{d}/no-such-model"]}, {}, ("no-such-model", "not found")),
    BadInput("--model empty string", {"models": [""]}, {}, ("--model ''", "empty")),
    BadInput("--model a file, not a directory", {"models": ["{d}/model.bin"]}, {"model.bin": "x"},
             ("--model <dir>/model.bin", "a file, not a directory")),
    BadInput("--model a symbolic link loop", {"models": ["{d}/loop"]}, {},
             ("--model <dir>/loop", "a symbolic link loop"), prepare=symlink_loop),
    BadInput("--model directory without config.json", {"models": ["{d}/empty"]}, {"empty/README": "x"},
             ("empty", "no config.json")),
    BadInput("--model checkpoint with a config but no weight files", {"models": ["{d}/noweights"]},
             {"noweights/config.json": _causal_config()}, ("noweights", "no weight files", "model.safetensors")),
    BadInput("--model a truncated model.safetensors", {"models": ["{d}/trunc"]},
             {"trunc/config.json": _causal_config(), "trunc/model.safetensors": _safetensors()[:-7]},
             ("model.safetensors: truncated", "its header describes")),
    BadInput("--model a weight index naming a missing shard", {"models": ["{d}/shards"]},
             {"shards/config.json": _causal_config(),
              "shards/model.safetensors.index.json": json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})},
             ("model.safetensors.index.json names 1 shard(s) that are not in the directory", "model-00001-of-00002")),
    BadInput("--model not a causal LM", {"models": ["{d}/distilbert"]},
             {"distilbert/config.json": json.dumps({"model_type": "distilbert"})},
             ("distilbert", "'distilbert' is not a causal language model")),
    BadInput("--model a BERT checkpoint (BertForMaskedLM) as a causal LM", {"models": ["{d}/bert"]},
             {"bert/config.json": json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}),
              "bert/model.safetensors": _safetensors()}, ("the checkpoint is a BertForMaskedLM, not a causal language model",)),
    BadInput("--model a BERT config without architectures", {"models": ["{d}/bert"]},
             {"bert/config.json": json.dumps({"model_type": "bert"}), "bert/model.safetensors": _safetensors()},
             ("'bert' is an encoder", "is_decoder")),
    BadInput("--model a checkpoint with its own code, without --trust-remote-code", {"models": ["{d}/custom"]},
             {"custom/config.json": json.dumps({"model_type": "my_arch", "auto_map": {
                 "AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyForCausalLM"}}),
              "custom/model.safetensors": _safetensors()}, ("--trust-remote-code", "its own modelling code")),
    BadInput("--model hub id not in the local cache", {"models": ["no-such-org/no-such-model"]}, {},
             ("no-such-org/no-such-model", "not in the local Hugging Face cache", "offline")),
    BadInput("--model hub revision not in the local cache", {"models": ["no-such-org/Model-1.5B@v2"]}, {},
             ("at revision 'v2'", "huggingface-cli download no-such-org/Model-1.5B --revision v2")),
    BadInput("--model neither a directory nor a hub id", {"models": ["org/bad--name"]}, {},
             ("not an existing directory", "ORG/NAME or ORG/NAME@REVISION")),
    BadInput("--model a file", {"models": ["{d}/weights.bin"]}, {"weights.bin": "x"},
             ("weights.bin", "a file, not a directory")),
    BadInput("--model causal LM without a tokenizer", {"models": ["{d}/notok"]},
             {"notok/config.json": _causal_config(), "notok/model.safetensors": _safetensors()},
             ("notok", "no usable tokenizer")),
    BadInput("--model ~/ckpt (~ expanded)", {"models": ["~/ckpt"]},
             {"ckpt/config.json": _causal_config(), "ckpt/model.safetensors": _safetensors()},
             ("--model ~/ckpt", "no usable tokenizer"), prepare=home_is_workdir),
    # data sets
    BadInput("--dataset file missing", {"datasets": ["{d}/none.jsonl"]}, {}, ("none.jsonl", "not found")),
    BadInput("--dataset empty string", {"datasets": [""]}, {}, ("--dataset ''", "empty")),
    BadInput("--dataset a directory, not a file", {"datasets": ["{d}/data"]}, {"data/a.jsonl": _rows(4)},
             ("--dataset <dir>/data", "a directory, not a file", "glob:")),
    BadInput("--dataset a symbolic link loop", {"datasets": ["{d}/loop"]}, {},
             ("--dataset <dir>/loop", "a symbolic link loop"), prepare=symlink_loop),
    BadInput("--dataset empty file", {"datasets": ["{d}/empty.jsonl"]}, {"empty.jsonl": ""}, ("empty.jsonl", "empty")),
    BadInput("--dataset a line that is not JSON", {"datasets": ["{d}/bad.jsonl"]},
             {"bad.jsonl": '{"text": "a"}\n{"text": oops}\n'},
             ("bad.jsonl: could not be read as json", "ArrowInvalid: JSON parse error")),
    BadInput("--dataset lacks the needed columns", {"datasets": ["{d}/cols.jsonl"]},
             {"cols.jsonl": '{"q": "a", "a": "b"}\n{"q": "c", "a": "d"}\n'}, ("cols.jsonl", "lack the needed ones", "prompt+completion")),
    BadInput("--dataset mixing prompt/completion rows with text rows", {"datasets": ["{d}/mixed.jsonl"]},
             {"mixed.jsonl": _rows(3) + '{"text": "plain"}\n' + _rows(3)},
             ("row 4 has fields ['text'], but row 1 has ['prompt', 'completion']",)),
    BadInput("--dataset whose rows are all blank", {"datasets": ["{d}/blank.jsonl"]},
             {"blank.jsonl": '{"text": " "}\n{"text": ""}\n'}, ("blank.jsonl", "needs at least 2 non-empty rows", "has 0")),
    BadInput("--dataset with one row", {"datasets": ["{d}/one.jsonl"]},
             {"one.jsonl": '{"prompt": "a", "completion": "b"}\n'}, ("one.jsonl", "needs at least 2 non-empty rows")),
    BadInput("--dataset prompts longer than seq_len", {"datasets": ["{d}/long.jsonl"]},
             {"long.jsonl": _rows(20, prompt="x" * 40)}, ("seq_len=32 leaves no completion token", "seq_len=42 or more")),
    BadInput("--dataset smaller than the batch", {"datasets": ["{d}/small.jsonl"]}, {"small.jsonl": _rows(12)},
             ("batch_size=16 is larger than the 11 training rows", "--set batch_size=11 or less")),
    BadInput("--dataset unsupported file type", {"datasets": ["{d}/d.xlsx"]}, {"d.xlsx": "x"}, ("d.xlsx", "unsupported file type")),
    BadInput("--dataset hub name not in the local cache", {"datasets": ["no-such-org/no-such-data"]}, {},
             ("no-such-org/no-such-data", "local Hugging Face cache")),
    BadInput("--dataset a file literally named f*.jsonl, f1.jsonl beside it", {"datasets": ["{d}/f*.jsonl"]},
             {"f*.jsonl": _rows(20, prompt="star"), "f1.jsonl": _rows(20, prompt="one")},
             ("read 20 rows", "from <dir>/f*.jsonl"), stage=ACCEPTED, describe=rows_read),
    BadInput("--dataset a file named d[1].jsonl", {"datasets": ["{d}/d[1].jsonl"]}, {"d[1].jsonl": _rows(20)},
             ("read 20 rows", "from <dir>/d[1].jsonl"), stage=ACCEPTED, describe=rows_read),
    BadInput("--dataset glob:PATTERN (the explicit way to read several files)", {"datasets": ["glob:{d}/f*.jsonl"]},
             {"f*.jsonl": _rows(10, prompt="star"), "f1.jsonl": _rows(10, prompt="one")},
             ("read 20 rows", "one0", "star0"), stage=ACCEPTED, describe=rows_read),
    BadInput("--dataset ~/data.jsonl (~ expanded)", {"datasets": ["~/data.jsonl"]}, {"data.jsonl": _rows(20)},
             ("read 20 rows", "from <dir>/data.jsonl"), stage=ACCEPTED, describe=rows_read, prepare=home_is_workdir),
    # inputs once answered with a traceback, a library's words or nothing, now through the plugin's hooks
    BadInput("--device CPU (upper case)", {"device": "CPU"}, {}, ("--device 'CPU'", "auto, cpu, cuda or cuda:N")),
    BadInput("--device cuda:abc", {"device": "cuda:abc"}, {}, ("--device 'cuda:abc'", "cuda:N (N a device number")),
    BadInput("--device cuda:0 where there is none", {"device": "cuda:0"}, {}, ("--device cuda:0", "no CUDA device")),
    BadInput("--case-timeout 1 (the time runs out as the case process starts)", {"case_timeout_s": 1.0}, {},
             ("status timeout", "stopped after the --case-timeout of 1 s"), stage=RUN, pytest_args=("-k", "config[lora]")),
    BadInput("--dataset whose prompts and completions are JSON numbers", {"datasets": ["{d}/numbers.jsonl"]},
             {"numbers.jsonl": _number_rows(40)}, ("read 40 rows as text", "prompt '100' -> completion '200'"),
             stage=ACCEPTED, describe=rows_as_text),
    BadInput("--dataset whose prompts are lists", {"datasets": ["{d}/lists.jsonl"]},
             {"lists.jsonl": "".join(json.dumps({"prompt": [k], "completion": "a"}) + "\n" for k in range(20))},
             ("lists.jsonl: field 'prompt' holds", "it must hold text")),
    BadInput("--dataset a file of blank lines", {"datasets": ["{d}/blank-lines.jsonl"]}, {"blank-lines.jsonl": "\n\n  \n\n"},
             ("blank-lines.jsonl: holds only blank lines: no rows to train on",)),
    BadInput("--dataset a CSV header with no rows", {"datasets": ["{d}/header.csv"]}, {"header.csv": "prompt,completion\n"},
             ("header.csv: holds a header row (prompt,completion) and no data rows",)),
    BadInput("--dataset a binary file named .jsonl", {"datasets": ["{d}/binary.jsonl"]}, {"binary.jsonl": bytes(range(256)) * 4},
             ("binary.jsonl: not a text file (byte 0 is NUL)", "UTF-8 text")),
    # tiny-llama ships with the package; tiny-gpt2 is built into the cache on first use
    BadInput("LORABENCH_CACHE a file (--model tiny-gpt2)", {"models": ["tiny-gpt2"]}, {"cache": "x"},
             ("LORABENCH_CACHE=<dir>/cache: cannot write there", "a file stands where the directory should be",
              "tiny-gpt2 is built there"), env={"LORABENCH_CACHE": "{d}/cache"}),
    BadInput("LORABENCH_CACHE an empty read-only directory (--model tiny-gpt2)", {"models": ["tiny-gpt2"]}, {},
             ("LORABENCH_CACHE=<dir>/ro: cannot write there", "read-only or not permitted"),
             env={"LORABENCH_CACHE": "{d}/ro"}, prepare=read_only_dir),
    BadInput("--model a checkpoint whose model.safetensors holds other tensors", {"models": ["{d}/other"]},
             {"other/config.json": _causal_config(), "other": save_tokenizer,
              "other/model.safetensors": _tensors({"encoder.weight": (8, 8), "decoder.bias": (8,)})},
             ("the checkpoint lacks 12 of the 12 tensors of the LlamaForCausalLM", "first model.embed_tokens.weight",
              "it holds 2 other tensor(s), first decoder.bias, encoder.weight")),
    BadInput("--model a sharded checkpoint whose shards hold the embedding and the head only", {"models": ["{d}/sharded"]},
             {"sharded/config.json": _causal_config(), "sharded": save_tokenizer,
              "sharded/model.safetensors.index.json": json.dumps({"weight_map": {
                  "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}}),
              "sharded/model-00001-of-00002.safetensors": _tensors({"model.embed_tokens.weight": (16, 8)}),
              "sharded/model-00002-of-00002.safetensors": _tensors({"lm_head.weight": (16, 8)})},
             ("the checkpoint lacks 10 of the 12 tensors", "first model.layers.0.")),
    BadInput("--model a checkpoint with tied embeddings, the output layer not stored", {"models": ["{d}/tied"]},
             {"tied/config.json": _causal_config(tie_word_embeddings=True), "tied": save_tokenizer,
              "tied/model.safetensors": _tensors(TINY_LLAMA_TENSORS)},
             ("checkpoint found at <dir>/tied",), stage=ACCEPTED, describe=model_checked),
    BadInput("--model the same tensors, embeddings not tied (the output layer missing)", {"models": ["{d}/untied"]},
             {"untied/config.json": _causal_config(tie_word_embeddings=False), "untied": save_tokenizer,
              "untied/model.safetensors": _tensors(TINY_LLAMA_TENSORS)},
             ("the checkpoint lacks 1 of the 12 tensors", "first lm_head.weight")),
    BadInput("--model a checkpoint whose embedding has another shape", {"models": ["{d}/resized"]},
             {"resized/config.json": _causal_config(), "resized": save_tokenizer,
              "resized/model.safetensors": _tensors({"model.embed_tokens.weight": (17, 8)})},
             ("tensor model.embed_tokens.weight has shape [17, 8] in the checkpoint", "needs [16, 8]")),
    BadInput("--model auto_map for an unknown model type, without AutoConfig", {"models": ["{d}/custom"]},
             {"custom/config.json": json.dumps({"model_type": "my_arch",
                                                "auto_map": {"AutoModelForCausalLM": "modeling_my.MyForCausalLM"}}),
              "custom/model.safetensors": _safetensors()},
             ("model type 'my_arch' is not one transformers knows", "auto_map", "names no AutoConfig",
              "--trust-remote-code")),
    BadInput("--model auto_map with --trust-remote-code, its code files absent", {"models": ["{d}/custom"],
                                                                                 "trust_remote_code": True},
             {"custom/config.json": json.dumps({"model_type": "my_arch", "auto_map": {
                 "AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyForCausalLM"}}),
              "custom/model.safetensors": _safetensors()},
             ("auto_map of config.json names code in configuration_my.py, modeling_my.py", "not in the checkpoint")),
    BadInput("-k 'config[qlora_nf5]' (no such configuration)", {}, {},
             ("-k 'config[qlora_nf5]' selects no case", "names no configuration", "known: full", "qlora_nf4"),
             pytest_args=("-k", "config[qlora_nf5]")),
    BadInput("-k 'model[tiny-lama]' (a misspelt model)", {}, {},
             ("names no model of this run; known: tiny-llama",), pytest_args=("-k", "model[tiny-lama]")),
    BadInput("--shard '' (empty)", {}, {}, ("--shard ''", "empty"), pytest_args=("--shard=",)),
    BadInput("--shard -1/2 (a value that starts with '-')", {}, {}, ("--shard '-1/2'", "write I/N"),
             pytest_args=("--shard", "-1/2")),
    BadInput("--memory-budget -5GiB (a value that starts with '-')", {}, {}, ("--memory-budget '-5GiB'",),
             pytest_args=("--memory-budget", "-5GiB")),
    BadInput("--seeds with an empty item (1,,2)", {"seeds": "1,,2"}, {}, ("--seeds '1,,2'", "item 2 is empty")),
    BadInput("--cpu-threads 999 (more than the cores)", {"cpu_threads": "999"}, {},
             ("--cpu-threads 999: this process may use", "999 threads share them"), stage=ACCEPTED,
             describe=notices_given),
    BadInput("thresholds: version: true (a bool, not 1)", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: true\nprofiles: {}\n"}, ("gates.yaml:1", "version must be 1")),
    BadInput("thresholds: a cpu rule on a CUDA-only figure", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 1\nprofiles:\n  cpu:\n    '*':\n      - peak_alloc_mib <= 100\n"},
             ("gates.yaml:5", "in profile 'cpu' reads peak_alloc_mib, which only a CUDA device records")),
    BadInput("--model tiny-llama twice", {"models": ["tiny-llama", "tiny-llama"]}, {},
             ("--model tiny-llama: given twice",)),
    BadInput("--dataset digit-reverse twice", {"datasets": ["digit-reverse", "digit-reverse"]}, {},
             ("--dataset digit-reverse: given twice",)),
    BadInput("--model two checkpoints whose names end alike (a/ckpt, b/ckpt)", {"models": ["{d}/a/ckpt", "{d}/b/ckpt"]},
             {}, ("case id 'ckpt-full' stands for two cases", "rename one")),
    BadInput("--steps 9 --set steps=6", {"steps": 9, "overrides": ["steps=6"]}, {},
             ("--steps 9 and --set steps=6 conflict",)),
    BadInput("matrix: 3,000 configurations (about 300 KB, no aliases)", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": _matrix_of(3000)}, ("read 3,000 configurations, 3,000 cases collected",), stage=ACCEPTED,
             describe=configurations_read),
    BadInput("matrix: a 1 MB YAML tag (not echoed whole)", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs: !" + "x" * 1_000_000 + " []\n"}, ("(1,000,001 characters)", "is not allowed")),
    # training: a loss that does not become NaN still stops the case
    # (a 40-row data set, fp32 and a window of 4 steps keep these to seconds; the default window is 10)
    # (tiny-llama's shipped checkpoint takes lr=1e9 to a loss that stays up, lr=1e3 to one that doubles at once)
    BadInput("--set lr=1e3 (the loss more than doubles, never NaN)",
             {"overrides": ["lr=1e3", "steps=8", "divergence_window=4", "dtype=fp32", "batch_size=4"],
              "datasets": ["{d}/reverse.jsonl"]}, {"reverse.jsonl": _reverse_rows(40)},
             ("status diverged", "is above 2 x the first step's", "(divergence_factor=2) at step 2"), stage=TRAINING),
    BadInput("--set lr=1e9 --set divergence_factor=3 (the loss stays up, never NaN)",
             {"overrides": ["lr=1e9", "steps=8", "divergence_window=4", "divergence_factor=3", "dtype=fp32",
                            "batch_size=4"], "datasets": ["{d}/reverse.jsonl"]}, {"reverse.jsonl": _reverse_rows(40)},
             ("status diverged", "loss has not fallen below the first step's", "over steps 1-4", "at step 4"),
             stage=TRAINING),
    # the command line
    BadInput("compare --fail, the latest stored run has a diverged case", {}, HISTORY,
             ("exit 1", "run 0003_run3 (c3): 1 case(s) did not finish: lora diverged", "this fails --fail"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail")),
    BadInput("compare --fail --skip-broken", {}, HISTORY,
             ("exit 0", "skipped run 0003_run3 (c3): 1 case(s) did not finish", "A = 0001_run1 (c1), B = 0002_run2 (c2)"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail", "--skip-broken")),
    BadInput("compare, the latest stored run holds no lorabench result", {},
             dict([_stored_run(1, ("lora", "ok", None)), _stored_run(2, ("lora", "ok", None)),
                   ("history/Linux-CPython-3.11-64bit/0003_run3.json",
                    json.dumps({"benchmarks": [{"name": "test_overhead", "extra_info": {}}]}))]),
             ("exit 2", "0003_run3.json: holds no lorabench result", "pass --skip-broken"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail")),
    BadInput("report, a model path with $...$, <, |, backticks and 300 non-ASCII characters", {},
             dict([_stored_run(1, ("lora", "ok", None), model=SAFE_NAME)]),
             ("exit 0", "wrote 12 files", "m-\\$x^^2\\$ &lt;b&gt;\\|\\`q\\`\\|"),
             stage=COMMAND, argv=("report", "--storage", "{d}/history", "--out", "{d}/reports")),
    # ----- stored runs and commands
    BadInput("compare --fail, the latest stored run holds eval_loss NaN", {},
             dict([_stored_run(1, ("lora", "ok", None)),
                   (_stored_run(2)[0], _stored_run(2, ("lora", "ok", None))[1].replace('"eval_loss": 0.5', '"eval_loss": NaN'))]),
             ("exit 1", "case lora: metric eval_loss is nan (not finite): read as not measured",
              "lora: eval_loss 0.5 -> - B's stored value is not a finite number: nan"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail"), env={"COLUMNS": "1000"}),
    BadInput("compare --fail, the latest stored run holds eval_loss Infinity", {},
             dict([_stored_run(1, ("lora", "ok", None)),
                   (_stored_run(2)[0], _stored_run(2, ("lora", "ok", None))[1].replace('"eval_loss": 0.5', '"eval_loss": Infinity'))]),
             ("exit 1", "metric eval_loss is inf (not finite)", "B's stored value is not a finite number: inf"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail"), env={"COLUMNS": "1000"}),
    BadInput("compare --fail, the latest stored run holds eval_loss as a string", {},
             dict([_stored_run(1, ("lora", "ok", None)),
                   (_stored_run(2)[0], _stored_run(2, ("lora", "ok", None))[1].replace('"eval_loss": 0.5', '"eval_loss": "0.5"'))]),
             ("exit 1", "metric eval_loss is '0.5' (not a number)", "B's stored value is not a finite number: '0.5'"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail"), env={"COLUMNS": "1000"}),
    BadInput("compare, a stored record with a key this version does not know", {},
             dict([_stored_run(1, ("lora", "ok", None)),
                   (_stored_run(2)[0], _stored_run(2, ("lora", "ok", None))[1].replace('"schema": 1,', '"schema": 1, "gpu_temperature": 71,'))]),
             ("exit 0", "case lora: unknown record key 'gpu_temperature' ignored (not a field of a schema 1 record)"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail"), env={"COLUMNS": "1000"}),
    BadInput("compare, a stored record whose metrics are not a mapping", {},
             dict([_stored_run(1, ("lora", "ok", None)),
                   (_stored_run(2)[0], _stored_run(2, ("lora", "ok", None))[1].replace('"metrics": {', '"metrics": "fast", "m": {'))]),
             ("exit 2", "0002_run2.json: benchmark 'test_finetune[lora]': record key 'metrics': must be a mapping, not str",
              "pass --skip-broken"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail"), env={"COLUMNS": "1000"}),
    BadInput("compare --fail, the latest stored run was interrupted (Ctrl-C, marked)", {},
             dict([_stored_run(1, ("lora", "ok", None)), _stored_run(2, ("lora", "ok", None)),
                   (_stored_run(3)[0], _stored_run(3, ("lora", "ok", None))[1].replace(
                       '{"machine_info"', '{"lorabench_interrupted": "stopped by Ctrl-C, SIGINT or pytest.exit after 1 '
                       'recorded case(s)", "machine_info"', 1))]),
             ("exit 0", "0003_run3.json: an interrupted run (stopped by Ctrl-C", "A = 0001_run1 (c1), B = 0002_run2 (c2)"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail"), env={"COLUMNS": "1000"}),
    BadInput("compare --fail, the latest stored run was interrupted before runs were marked", {},
             dict([_stored_run(1, ("lora", "ok", None)), _stored_run(2, ("lora", "ok", None)),
                   (_stored_run(3)[0], json.dumps({"benchmarks": [{"name": "test_finetune[lora]", "stats": {"rounds": 2},
                                                                   "extra_info": {}}]}))]),
             ("exit 0", "'test_finetune[lora]' has 2 timed round(s) and no lorabench record: the run stopped mid-case",
              "A = 0001_run1 (c1), B = 0002_run2 (c2)"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--fail"), env={"COLUMNS": "1000"}),
    BadInput("report, the latest stored run was interrupted", {},
             dict([_stored_run(1, ("lora", "ok", None)),
                   (_stored_run(2)[0], json.dumps({"benchmarks": [{"name": "test_finetune[lora]", "stats": {"rounds": 2},
                                                                   "extra_info": {}}]}))]),
             ("exit 0", "skipped run <dir>/history/Linux-CPython-3.11-64bit/0002_run2.json: an interrupted run"),
             stage=COMMAND, argv=("report", "--storage", "{d}/history", "--out", "{d}/reports"), env={"COLUMNS": "1000"}),
    BadInput("compare --thresholds nope.yaml (no such file)", {}, HISTORY,
             ("exit 2", "--thresholds <dir>/nope.yaml: not found"),
             stage=COMMAND, argv=("compare", "--storage", "{d}/history", "--thresholds", "{d}/nope.yaml")),
    BadInput("report --out under a path component that is a file", {}, {**HISTORY, "a-file": "not a folder"},
             ("exit 2", "report --out <dir>/a-file/reports: cannot be made a folder (a component of the path is a file"),
             stage=COMMAND, argv=("report", "--storage", "{d}/history", "--out", "{d}/a-file/reports")),
    BadInput("merge --out under a path component that is a file", {}, {**HISTORY, "a-file": "not a folder"},
             ("exit 2", "merge --out <dir>/a-file/merged.json: its folder <dir>/a-file: cannot be made a folder"),
             stage=COMMAND, argv=("merge", "1", "2", "--storage", "{d}/history", "--out", "{d}/a-file/merged.json")),
    # ----- fit: refused before any prediction, naming the key or value and what is allowed (exit 2)
    BadInput("fit --seq-len 1000000000 (past the model's positions)", {},
             {"m/config.json": _causal_config(max_position_embeddings=2048)},
             ("exit 2", "--seq-len 1000000000: past <dir>/m's max_position_embeddings of 2048", "give at most 2048"),
             stage=COMMAND, argv=("fit", "--model", "{d}/m", "--seq-len", "1000000000")),
    BadInput("fit --seq-len 200000 on a model of 4096 positions", {},
             {"m/config.json": _causal_config(max_position_embeddings=4096)},
             ("exit 2", "--seq-len 200000: past <dir>/m's max_position_embeddings of 4096"),
             stage=COMMAND, argv=("fit", "--model", "{d}/m", "--seq-len", "200000")),
    BadInput("fit, config.json with hidden_size: -256", {}, {"m/config.json": _causal_config(hidden_size=-256)},
             ("exit 2", "m/config.json: hidden_size -256: must be a whole number above 0"),
             stage=COMMAND, argv=("fit", "--model", "{d}/m")),
    BadInput("fit, config.json with vocab_size: 0", {}, {"m/config.json": _causal_config(vocab_size=0)},
             ("exit 2", "m/config.json: vocab_size 0: must be a whole number above 0"),
             stage=COMMAND, argv=("fit", "--model", "{d}/m")),
    BadInput("fit, config.json with num_attention_heads: 0", {}, {"m/config.json": _causal_config(num_attention_heads=0)},
             ("exit 2", "m/config.json: num_attention_heads 0: must be a whole number above 0"),
             stage=COMMAND, argv=("fit", "--model", "{d}/m")),
    BadInput("fit, config.json with num_hidden_layers: 0", {}, {"m/config.json": _causal_config(num_hidden_layers=0)},
             ("exit 2", "m/config.json: num_hidden_layers 0: must be a whole number above 0"),
             stage=COMMAND, argv=("fit", "--model", "{d}/m")),
    BadInput("fit, config.json without hidden_size", {},
             {"m/config.json": json.dumps({k: v for k, v in json.loads(_causal_config()).items() if k != "hidden_size"})},
             ("exit 2", "m/config.json: no hidden_size (nor n_embd, d_model)", "not this model"),
             stage=COMMAND, argv=("fit", "--model", "{d}/m")),
    BadInput("fit, config.json with hidden_size not divisible by the heads", {},
             {"m/config.json": _causal_config(hidden_size=9)},
             ("exit 2", "hidden_size 9 is not divisible by num_attention_heads 2", "give head_dim"),
             stage=COMMAND, argv=("fit", "--model", "{d}/m")),
    BadInput("fit, config.json with hidden_size given as a string", {}, {"m/config.json": _causal_config(hidden_size="8")},
             ("exit 2", "m/config.json: hidden_size '8': must be a whole number above 0"),
             stage=COMMAND, argv=("fit", "--model", "{d}/m")),
    BadInput("fit --json DIR (a folder, checked before predicting)", {}, {"out-dir/keep": ""},
             ("exit 2", "--json <dir>/out-dir: is a directory; give a file path"),
             stage=COMMAND, argv=("fit", "--model", "tiny-llama", "--json", "{d}/out-dir")),
    BadInput("fit --out FILE (a file, checked before predicting)", {}, {"a-file": "not a folder"},
             ("exit 2", "--out <dir>/a-file: is a file; give a folder"),
             stage=COMMAND, argv=("fit", "--model", "tiny-llama", "--out", "{d}/a-file")),
    BadInput("fit --memory -5GiB", {}, {},
             ("exit 2", "--memory '-5GiB': the budget must be more than 0 bytes"),
             stage=COMMAND, argv=("fit", "--model", "tiny-llama", "--memory", "-5GiB")),
]


# ----- running an input ---------------------------------------------------------------------------
def _fill(value, workdir: Path):
    if isinstance(value, list):
        return [_fill(v, workdir) for v in value]
    if isinstance(value, tuple):
        return tuple(_fill(v, workdir) for v in value)
    return value.replace("{d}", str(workdir)) if isinstance(value, str) else value


def trigger(bad: BadInput, workdir: Path) -> Outcome:
    """Run ``bad`` as the bench or the command line would and return what the user gets.

    Raises:
        AssertionError: an input that must be refused was accepted, or the reverse.
    """
    for rel, content in bad.files.items():
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        else:
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with (bad.prepare(workdir) if bad.prepare else contextlib.nullcontext()), _environment(bad, workdir):
        started = time.perf_counter()
        if bad.stage == COMMAND:
            code, message = _run_command(bad, workdir)
        elif bad.stage == TRAINING:
            code, message = None, _train_first_lora_case(_session(bad, workdir))
        else:
            code, message = _through_plugin(bad, workdir)
        seconds = time.perf_counter() - started
    message = message.replace(str(workdir), "<dir>").replace(str(ROOT), "<root>")
    message = re.sub(r"reports/runs/\d{8}-\d{6}-\d+", "reports/runs/<run>", message)  # a log directory per run
    for words in bad.expect:
        assert words in message, f"{bad.name}: {words!r} not in {message!r}"
    return Outcome(bad.stage, message, seconds, code)


@contextlib.contextmanager
def _environment(bad: BadInput, workdir: Path) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in bad.env}
    os.environ.update({name: _fill(value, workdir) for name, value in bad.env.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def pytest_argv(bad: BadInput, workdir: Path) -> list[str]:
    """The row as pytest's arguments: each option as ``--option=value`` (so an empty value or one that
    starts with '-' reaches the plugin as given), then ``pytest_args`` as typed."""
    args = []
    for key, value in bad.options.items():
        if key == "trust_remote_code":
            args += ["--trust-remote-code"] if value else []
            continue
        for item in value if isinstance(value, list) else [value]:
            item = _fill(item, workdir)
            args.append(f"{PYTEST_OPTIONS[key]}={item:g}" if isinstance(item, float) else f"{PYTEST_OPTIONS[key]}={item}")
    for key, value in bad.outputs.items():
        path = _fill(value, workdir)
        args += [f"--benchmark-storage={path}", "--benchmark-autosave"] if key == "storage" else [f"--benchmark-json={path}"]
    return args + list(_fill(bad.pytest_args, workdir))


class _SessionGrab:
    """A plugin for an in-process run: keeps lorabench's session, for the rows that describe what it read, and
    the usage error pytest prints as ``ERROR: ...``. The error is taken from the exception, not the printed
    text: under an outer pytest with live logging, a log record makes it reset ``sys.stderr`` to its own
    capture, so a redirect can miss the line."""

    session = None
    error: str | None = None

    @pytest.hookimpl(wrapper=True)
    def pytest_cmdline_parse(self):  # argparse's errors (another plugin's option)
        try:
            return (yield)
        except pytest.UsageError as exc:
            self.error = "\n".join(map(str, exc.args))
            raise

    @pytest.hookimpl(wrapper=True)
    def pytest_cmdline_main(self):  # the plugin's refusals, from configure to the end of collection
        try:
            return (yield)
        except pytest.UsageError as exc:
            self.error = "\n".join(map(str, exc.args))
            raise

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # imported once pytest has registered the plugin (before, it could not rewrite the plugin's asserts)
        from lorabench.pytest_plugin.hooks import SESSION_KEY

        self.session = session.config.stash.get(SESSION_KEY, None)


def run_in_process(args: list[str]):
    """``pytest bench/test_finetune.py ARGS`` in this process, with the installed plugin.

    Returns:
        The exit status, what pytest wrote (with its usage error, if any, as it prints it), and lorabench's
        session (``None`` if none was opened).
    """
    grab, output = _SessionGrab(), io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = pytest.main([str(BENCH_FILE), *IN_PROCESS, *args], plugins=[grab])
    text = output.getvalue()
    if grab.error is not None and usage_error(text) is None:
        text += f"ERROR: {grab.error}\n\n"
    return int(code), text, grab.session


def usage_error(output: str) -> str | None:
    """The message pytest prints for a usage error (``ERROR: ...`` up to the next blank line); for one
    of argparse's (an option of another plugin), its ``error:`` line without the usage text."""
    match = re.search(r"^ERROR: (.*?)\n\s*(?:\n|\Z)", output, re.M | re.S)
    if not match:
        return None
    argparse_error = re.search(r"^\S+: error: (.*)$", match.group(1), re.M)
    return " ".join((argparse_error or match).group(1).split())


def _through_plugin(bad: BadInput, workdir: Path) -> tuple[int, str]:
    args = pytest_argv(bad, workdir)
    code, output, session = run_in_process(args + (["-q"] if bad.stage == RUN else ["--collect-only", "-q"]))
    assert code != pytest.ExitCode.INTERNAL_ERROR and "INTERNALERROR" not in output and "Traceback" not in output, (
        f"{bad.name}: exit {code}\n{output[-3000:]}")
    error = usage_error(output)
    if bad.stage == STARTUP:
        assert code == pytest.ExitCode.USAGE_ERROR and error, f"{bad.name}: exit {code}, not refused\n{output[-3000:]}"
        return code, error
    assert error is None, f"{bad.name}: refused ({error})"
    if bad.stage == ACCEPTED:
        assert code == pytest.ExitCode.OK, f"{bad.name}: exit {code}\n{output[-3000:]}"
        return code, bad.describe(session, workdir)
    result = session.results[0]
    return code, f"status {result.status}: {result.error}"


def _session(bad: BadInput, workdir: Path):
    """The session of a row that trains in this process (TRAINING), opened as the plugin opens it."""
    options = {k: _fill(v, workdir) for k, v in bad.options.items()}
    session = open_session(root=ROOT, **options)
    session.load_gates()
    session.check_inputs()
    return session


def _train_first_lora_case(session) -> str:
    from lorabench.run.launch import InlineLauncher, resolve_case
    from lorabench.models.loading import load_tokenizer
    from lorabench.kinds.finetune import tokenize_task

    i, case = next((i, c) for i, c in enumerate(session.matrix.cases())
                   if c.config.method == "lora" and not c.config.quantized)
    resolved = resolve_case("finetune", case_id=session.matrix.ids()[i], model=case.model, dataset=case.dataset,
                            device=session.device, config=case.config, source=session.model_source(case.model))
    # the data set as the session read it (a --dataset file's rows), tokenized for the case
    result = InlineLauncher().run(resolved, data_for=lambda c: tokenize_task(session.task(c.dataset),
                                                                             load_tokenizer(c.source), c.config.seq_len))
    return f"status {result.status}: {result.error}"


def _run_command(bad: BadInput, workdir: Path) -> tuple[int, str]:
    from lorabench.commands.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(_fill(bad.argv, workdir)))
    lines = [line for line in (out.getvalue() + err.getvalue()).splitlines()
             if re.search(r"error|skipped|did not finish|A = |wrote|WARNING|regression|  \S+: ", line)]
    if bad.argv[0] == "report" and code == 0:
        md = (workdir / "reports" / "summary.md").read_text()
        title = next(line for line in md.splitlines() if line.startswith("## "))
        lines = [line for line in lines if line.startswith("skipped")] + [
            f"wrote {sum(line.startswith('wrote') for line in lines)} files", f"summary.md heading: {title[:60]}..."]
    return code, f"exit {code}; " + "; ".join(lines)


_OUTCOMES: dict[str, Outcome] = {}


def outcome(bad: BadInput) -> Outcome:
    """The input's outcome, computed once per process (the per-row tests and the table share it)."""
    if bad.name not in _OUTCOMES:
        with tempfile.TemporaryDirectory() as tmp:
            _OUTCOMES[bad.name] = trigger(bad, Path(tmp))
    return _OUTCOMES[bad.name]


@pytest.mark.parametrize("bad", CATALOG, ids=[b.name for b in CATALOG])
def test_each_input_gets_a_clear_answer(bad):
    result = outcome(bad)
    if bad.stage in (STARTUP, ACCEPTED):
        assert result.seconds < 60, f"{bad.name}: {result.seconds:.1f} s at start-up"
    if result.exit is not None:  # the standard: a usage error (4), or the command's own status, never 3
        assert result.exit in (0, 1, 2, 4), f"{bad.name}: exit {result.exit}"


# one row per hook that can refuse an input, run again as a real pytest command (no --collect-only)
SUBPROCESS_ROWS = {
    "--device cuda where there is none": "pytest_configure: lorabench's options, the device looked up",
    "--shard -1/2 (a value that starts with '-')": "pytest_configure: --shard (scale-out)",
    "--set seq_len=1": "pytest_collection_modifyitems: the selected cases' inputs",
    "-k 'config[qlora_nf5]' (no such configuration)": "pytest_collection_modifyitems: a selection of no case",
}


def test_a_real_pytest_run_answers_as_the_in_process_one():
    """The in-process path (pytest.main) and ``python -m pytest`` give the same exit status and message,
    for one row per refusing hook; the subprocesses run side by side."""
    rows = [b for b in CATALOG if b.name in SUBPROCESS_ROWS]
    assert len(rows) == len(SUBPROCESS_ROWS)
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i, bad in enumerate(rows):
            assert not bad.files and not bad.prepare and not bad.env, f"{bad.name}: a subprocess row needs no set-up"
            command = [sys.executable, "-m", "pytest", str(BENCH_FILE), "-p", "no:cacheprovider",
                       *pytest_argv(bad, Path(tmp) / str(i))]
            runs.append((bad, subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True)))
        for bad, process in runs:
            output, _ = process.communicate(timeout=600)
            expected = outcome(bad)
            assert "INTERNALERROR" not in output, f"{bad.name}:\n{output[-3000:]}"
            assert (process.returncode, usage_error(output)) == (expected.exit, expected.message), (
                f"{bad.name} ({SUBPROCESS_ROWS[bad.name]}): a real run answers differently\n{output[-3000:]}")


def test_the_catalog_is_large_and_documented():
    assert len(CATALOG) >= 90
    assert len({b.name for b in CATALOG}) == len(CATALOG)
    strip = lambda text: re.sub(r"\| [\d.]+ \|$", "| |", text, flags=re.M)  # noqa: E731 - timings vary by run
    written, current = strip((ROOT / "docs" / "bad-inputs.md").read_text()), strip(render_table())
    changed = [line for line in difflib.unified_diff(written.splitlines(), current.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert not changed, ("docs/bad-inputs.md is stale: run `python tests/test_bad_inputs.py > docs/bad-inputs.md`\n"
                         + "\n".join(line[:300] for line in changed[:6]))


def render_table() -> str:
    lines = [
        "# Bad inputs and what they get",
        "",
        "Generated from `tests/test_bad_inputs.py` (`python tests/test_bad_inputs.py > docs/bad-inputs.md`),",
        "where each row is also a test. Start-up rows run `pytest bench/test_finetune.py --collect-only OPTIONS`",
        "through the installed plugin (in the test's process, `pytest.main`), so every hook that reads an input",
        "runs; rows " + ", ".join(str(i) for i, b in enumerate(CATALOG, 1) if b.name in SUBPROCESS_ROWS)
        + " (one per hook that can refuse) also run as a `python -m pytest` subprocess, which must give the same",
        "exit status and message.",
        f"*{STARTUP}*: the run stops before any case trains, pytest exits with status 4 (usage error).",
        f"*{ACCEPTED}*: an input once mishandled, now read literally. *{RUN}*: the selected case runs",
        f"through the plugin and is recorded with the status shown. *{TRAINING}*: the first LoRA case trains",
        "in the test's process. *command*: `python -m lorabench ...`, with its exit status. `<dir>` stands for",
        "the directory holding the files, `<root>` for the repository; seconds are wall time from start-up to",
        f"the answer, on the machine that generated the table (a {_cpu_description()} shared with other work, so",
        "they read slow; the first rows that build a model also pay for importing torch and transformers).",
        "",
        "| # | input | outcome | exit | message | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for i, bad in enumerate(CATALOG, 1):
        result = outcome(bad)
        one_line = " ".join(result.message.split()).replace("|", "\\|")
        code = "-" if result.exit is None else result.exit
        lines.append(f"| {i} | {bad.name} | {result.stage} | {code} | {one_line} | {result.seconds:.2f} |")
    return "\n".join(lines) + "\n"


def _cpu_description() -> str:
    """``N-core MODEL`` from /proc/cpuinfo (the machine's own words), or the core count alone."""
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return f"{os.cpu_count()}-core {names[0].strip()}" if names else f"{os.cpu_count()}-core CPU"


if __name__ == "__main__":
    sys.stdout.write(render_table())

"""Every bad input a user can give fails before any training, with a message naming what is wrong.

Each entry of ``CATALOG`` goes through the same code a bench run does at start-up
(:func:`lorabench.session.open_session`, then ``load_gates`` and ``check_inputs``).
The table in docs/bad-inputs.md is generated from this catalog, and a test keeps it current:

    python tests/test_bad_inputs.py > docs/bad-inputs.md
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorabench.errors import LorabenchError  # noqa: E402
from lorabench.session import open_session  # noqa: E402

GATES_HEAD = "version: 1\nprofiles:\n  default:\n"


@dataclass(frozen=True)
class BadInput:
    """One bad input: the files it writes, the options it passes, and words its message must hold."""

    name: str
    options: dict
    files: dict[str, str] = field(default_factory=dict)
    expect: tuple[str, ...] = ()
    patch_cuda_without_bf16: bool = False


def _causal_config() -> str:
    return json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                       "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 16})


CATALOG = [
    # thresholds.yaml
    BadInput("thresholds: not valid YAML", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*': [loss_drop >= 0.1\n"}, ("gates.yaml:", "not valid YAML")),
    BadInput("thresholds: unknown metric", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*':\n      - peak_vram <= 3\n"}, ("gates.yaml:5", "unknown metric 'peak_vram'")),
    BadInput("thresholds: unknown configuration", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    qlora_nf5:\n      - loss_drop >= 0.1\n"},
             ("gates.yaml:4", "unknown configuration 'qlora_nf5'", "qlora_nf4")),
    BadInput("thresholds: bound is not a number", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*':\n      - step_ms <= fast\n"}, ("gates.yaml:5", "step_ms <= fast")),
    BadInput("thresholds: rules not a list", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*': loss_drop >= 0.1\n"}, ("gates.yaml:4", "must be a list")),
    BadInput("thresholds: contradictory bounds", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": GATES_HEAD + "    '*':\n      - step_ms <= 10\n      - step_ms >= 20\n"},
             ("gates.yaml", "step_ms", "contradict")),
    BadInput("thresholds: unknown top-level key", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 1\ngates: {}\nprofiles: {}\n"}, ("gates.yaml:2", "unknown key 'gates'")),
    BadInput("thresholds: unknown profile", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 1\nprofiles:\n  tpu:\n    '*':\n      - loss_drop >= 0.1\n"}, ("gates.yaml:3", "tpu")),
    BadInput("thresholds: wrong version", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 2\nprofiles: {}\n"}, ("gates.yaml:1", "version must be 1")),
    BadInput("thresholds: a Python object tag (unsafe YAML)", {"thresholds": "{d}/gates.yaml"},
             {"gates.yaml": "version: 1\nprofiles: !!python/object/apply:os.system ['echo owned']\n"},
             ("gates.yaml", "python/object/apply")),
    BadInput("thresholds: file missing", {"thresholds": "{d}/nope.yaml"}, {}, ("nope.yaml", "not found")),
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
    BadInput("matrix: a Python object tag (unsafe YAML)", {"matrix_file": "{d}/m.yaml"},
             {"m.yaml": "configs: !!python/object/apply:os.system ['echo owned']\n"}, ("m.yaml", "not valid YAML")),
    BadInput("matrix: file missing", {"matrix_file": "{d}/nope.yaml"}, {}, ("nope.yaml", "not found")),
    BadInput("compute dtype the device lacks (bf16 on a CUDA card without it)",
             {"device": "cuda", "overrides": ["dtype=bf16"]}, {},
             ("dtype='bf16' is not supported", "dtype=fp16"), patch_cuda_without_bf16=True),
    # command line
    BadInput("--set without '='", {"overrides": ["rank"]}, {}, ("--set 'rank'", "KEY=VALUE")),
    BadInput("--set unknown key", {"overrides": ["rnak=8"]}, {}, ("unknown key 'rnak'", "rank")),
    BadInput("--set lr not a number", {"overrides": ["lr=fast"]}, {}, ("lr='fast' is not a number",)),
    BadInput("--set optimizer unknown", {"overrides": ["optimizer=sgd"]}, {}, ("optimizer='sgd'", "paged_adamw_8bit")),
    BadInput("--steps 0", {"steps": 0}, {}, ("steps=0 must be at least 1",)),
    BadInput("--device cuda where there is none", {"device": "cuda"}, {}, ("--device cuda", "no CUDA device")),
    BadInput("--device unknown", {"device": "tpu"}, {}, ("--device 'tpu'", "auto, cpu, cuda")),
    BadInput("--memory-budget without a unit we know", {"memory_budget": "6 gigs"}, {}, ("--memory-budget '6 gigs'", "6GiB")),
    BadInput("--memory-budget 0", {"memory_budget": "0GiB"}, {}, ("more than 0 bytes",)),
    BadInput("--case-timeout negative", {"case_timeout_s": -1.0}, {}, ("--case-timeout -1", "positive")),
    BadInput("--seeds 0", {"seeds": "0"}, {}, ("--seeds '0'", "a count from 1 to 100")),
    BadInput("--seeds with a repeated seed", {"seeds": "7,7"}, {}, ("--seeds '7,7'", "seed 7 appears twice")),
    # models
    BadInput("--model path missing", {"models": ["{d}/no-such-model"]}, {}, ("no-such-model", "no such checkpoint directory")),
    BadInput("--model directory without config.json", {"models": ["{d}/empty"]}, {"empty/README": "x"},
             ("empty", "no config.json")),
    BadInput("--model not a causal LM", {"models": ["{d}/distilbert"]},
             {"distilbert/config.json": json.dumps({"model_type": "distilbert"})},
             ("distilbert", "'distilbert' is not a causal language model")),
    BadInput("--model hub id not in the local cache", {"models": ["no-such-org/no-such-model"]}, {},
             ("no-such-org/no-such-model", "not in the local Hugging Face cache", "offline")),
    BadInput("--model hub revision not in the local cache", {"models": ["no-such-org/Model-1.5B@v2"]}, {},
             ("at revision 'v2'", "huggingface-cli download no-such-org/Model-1.5B --revision v2")),
    BadInput("--model neither a directory nor a hub id", {"models": ["org/bad--name"]}, {},
             ("not an existing directory", "ORG/NAME or ORG/NAME@REVISION")),
    BadInput("--model a file", {"models": ["{d}/weights.bin"]}, {"weights.bin": "x"},
             ("weights.bin", "is a file")),
    BadInput("--model causal LM without a tokenizer", {"models": ["{d}/notok"]},
             {"notok/config.json": _causal_config()}, ("notok", "no usable tokenizer")),
    # data sets
    BadInput("--dataset file missing", {"datasets": ["{d}/none.jsonl"]}, {}, ("none.jsonl", "file not found")),
    BadInput("--dataset empty file", {"datasets": ["{d}/empty.jsonl"]}, {"empty.jsonl": ""}, ("empty.jsonl",)),
    BadInput("--dataset lacks the needed columns", {"datasets": ["{d}/cols.jsonl"]},
             {"cols.jsonl": '{"q": "a", "a": "b"}\n{"q": "c", "a": "d"}\n'}, ("cols.jsonl", "lack the needed ones", "prompt+completion")),
    BadInput("--dataset whose rows are all blank", {"datasets": ["{d}/blank.jsonl"]},
             {"blank.jsonl": '{"text": " "}\n{"text": ""}\n'}, ("blank.jsonl", "needs at least 2 non-empty rows", "has 0")),
    BadInput("--dataset with one row", {"datasets": ["{d}/one.jsonl"]},
             {"one.jsonl": '{"prompt": "a", "completion": "b"}\n'}, ("one.jsonl", "needs at least 2 non-empty rows")),
    BadInput("--dataset unsupported file type", {"datasets": ["{d}/d.xlsx"]}, {"d.xlsx": "x"}, ("d.xlsx", "unsupported file type")),
    BadInput("--dataset hub name not in the local cache", {"datasets": ["no-such-org/no-such-data"]}, {},
             ("no-such-org/no-such-data", "local Hugging Face cache")),
]


def trigger(bad: BadInput, workdir: Path) -> str:
    """Run ``bad`` through the bench's start-up checks and return the error message.

    Raises:
        AssertionError: the input was accepted.
    """
    for rel, text in bad.files.items():
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def fill(value):
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value.replace("{d}", str(workdir)) if isinstance(value, str) else value

    options = {k: fill(v) for k, v in bad.options.items()}
    try:
        session = open_session(root=ROOT, **options)
        session.load_gates()
        session.check_inputs()
    except LorabenchError as exc:
        return str(exc).replace(str(workdir), "<dir>")
    raise AssertionError(f"{bad.name}: accepted")


@pytest.fixture
def fake_cuda_without_bf16(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")


@pytest.mark.parametrize("bad", CATALOG, ids=[b.name for b in CATALOG])
def test_bad_input_fails_before_training_and_names_the_problem(bad, tmp_path, request):
    if bad.patch_cuda_without_bf16:
        request.getfixturevalue("fake_cuda_without_bf16")
    message = trigger(bad, tmp_path)
    for words in bad.expect:
        assert words in message, f"{bad.name}: {words!r} not in {message!r}"


def test_the_catalog_is_large_and_documented():
    assert len(CATALOG) >= 20
    assert (ROOT / "docs" / "bad-inputs.md").read_text() == render_table(), (
        "docs/bad-inputs.md is stale: run `python tests/test_bad_inputs.py > docs/bad-inputs.md`"
    )


def render_table() -> str:
    lines = [
        "# Bad inputs and the messages they get",
        "",
        "Generated from `tests/test_bad_inputs.py` (`python tests/test_bad_inputs.py > docs/bad-inputs.md`),",
        "where each row is also a test. Every one of these stops the run at start-up, before any case trains;",
        "pytest exits with status 4 (usage error). `<dir>` stands for the directory holding the file.",
        "",
        "| # | bad input | message |",
        "|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i, bad in enumerate(CATALOG, 1):
            if bad.patch_cuda_without_bf16:
                message = _with_fake_cuda(bad, Path(tmp) / str(i))
            else:
                message = trigger(bad, Path(tmp) / str(i))
            one_line = " ".join(message.split()).replace("|", "\\|")
            lines.append(f"| {i} | {bad.name} | {one_line} |")
    return "\n".join(lines) + "\n"


def _with_fake_cuda(bad: BadInput, workdir: Path) -> str:
    import torch

    saved = torch.cuda.is_available, torch.cuda.is_bf16_supported, torch.cuda.get_device_name
    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: False
    torch.cuda.get_device_name = lambda *a, **k: "Tesla T4"
    try:
        return trigger(bad, workdir)
    finally:
        torch.cuda.is_available, torch.cuda.is_bf16_supported, torch.cuda.get_device_name = saved


if __name__ == "__main__":
    sys.stdout.write(render_table())

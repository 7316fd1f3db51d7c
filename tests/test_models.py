"""Models: spec resolution, quantized loading, adapters, the 4-bit training layout (bad --model values:
test_bad_inputs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lorabench.config import BenchConfig, resolve
from lorabench.matrix import DEFAULT_CONFIGS
from lorabench.errors import ModelError
from lorabench.models.loading import apply_adapter, attention_module_names, load_model, resolve_model, split_hub_id
from lorabench.backends.precision import native_dtype, torch_dtype
from lorabench.models.zoo import ZOO

ROOT = Path(__file__).resolve().parent.parent
LORA = next(c.id for c in DEFAULT_CONFIGS if c.method == "lora" and c.quant == "none")  # LoRA on an unquantized base


def test_a_checkpoint_directory_goes_through_the_same_path(tiny_llama):
    source = resolve_model(tiny_llama.path)
    assert not source.embedded and source.path == tiny_llama.path


@pytest.fixture
def hub_cache(hf_home, monkeypatch):
    """Point huggingface_hub at the test cache, as HF_HOME does for a fresh process."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    return hf_home / "hub"


def test_a_dotted_hub_id_resolves_to_its_snapshot_in_the_local_cache(hub_cache, hub_id):
    source = resolve_model(hub_id)
    assert source.spec == hub_id and not source.embedded
    assert Path(source.path).parent.parent.name == "models--acme--Tiny-Llama-0.5B"
    assert (Path(source.path) / "config.json").is_file()
    pinned = resolve_model(f"{hub_id}@v1")
    assert pinned.path != source.path and pinned.spec == f"{hub_id}@v1"


def test_an_uncached_hub_id_says_so_and_how_to_fetch_it(hub_cache, hub_id):
    with pytest.raises(ModelError) as info:
        resolve_model("acme/Other-Model-1.5B")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and str(hub_cache) in message
    assert "huggingface-cli download acme/Other-Model-1.5B" in message
    with pytest.raises(ModelError, match=r"at revision 'v9'.*download acme/Tiny-Llama-0.5B --revision v9"):
        resolve_model(f"{hub_id}@v9")


@pytest.mark.parametrize("spec, repo, revision", [
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", None),
    ("meta-llama/Llama-3.2-1B@main", "meta-llama/Llama-3.2-1B", "main"),
    ("org/name@0123abc", "org/name", "0123abc"),
])
def test_hub_ids_split_into_repository_and_revision(spec, repo, revision):
    assert split_hub_id(spec) == (repo, revision)


@pytest.mark.parametrize("spec, words", [
    ("./no-such-dir", "no-such-dir: not found"),
    ("a/b/c", "a/b/c: not found"),
    ("org/bad--name", "ORG/NAME or ORG/NAME@REVISION"),
    ("org/name@", "empty revision"),
])
def test_specs_that_are_neither_a_directory_nor_a_hub_id(spec, words, hub_cache):
    with pytest.raises(ModelError, match=words):
        resolve_model(spec)


@pytest.mark.integration
def test_a_case_runs_on_a_dotted_hub_id_from_a_local_cache(hf_home, hub_id, tmp_path):
    """A fresh process finds the checkpoint through HF_HOME alone, as on a machine with a real cache."""
    gates = tmp_path / "gates.yaml"
    gates.write_text(f"version: 1\nprofiles:\n  default:\n    {LORA}:\n      - weights_mib > 0\n")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "--model", hub_id, "-k", f"config[{LORA}]", "--steps", "4", "--isolate", "none",
         f"--thresholds={gates}", "--benchmark-disable"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"{hub_id} on digit-reverse (cpu, trained in " in proc.stdout


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_family_loads_quantized_and_finds_attention_layers(name, cpu, quick_zoo):
    """Each family built through the zoo's path (two pre-training steps: this checks mechanics, not skill)."""
    source = resolve_model(name)
    assert source.embedded and source.path.startswith(str(quick_zoo.cache_root()))
    model = load_model(source, BenchConfig("q", quant="nf4", double_quant=True), cpu).model
    names = attention_module_names(model)
    assert names and all("lm_head" not in n for n in names)
    adapted = apply_adapter(model, BenchConfig("q", quant="nf4", double_quant=True, target_modules="attention"))
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_4bit_layers_keep_input_gradients_after_an_eval_pass(tiny_llama, cpu):
    """An eval-mode forward must not switch bitsandbytes to its autograd-less CPU inference kernel."""
    config = resolve(BenchConfig("q", quant="nf4", double_quant=True), tiny_llama.defaults, cpu)
    model = apply_adapter(load_model(tiny_llama, config, cpu).model, config)
    ids = torch.randint(3, 50, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        model(input_ids=ids, labels=ids).loss.backward()
    # lora_B starts at zero, so a first-layer q/k/v/gate/up adapter only gets a gradient
    # through the frozen 4-bit layers above it: the path the inference kernel would cut.
    first_layer_grads = {n: p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n}
    assert len(first_layer_grads) == 7
    assert all(g is not None and g.abs().sum() > 0 for g in first_layer_grads.values())


def test_full_fine_tuning_trains_every_weight(tiny_llama, cpu):
    model = apply_adapter(load_model(tiny_llama, BenchConfig("f", method="full"), cpu).model, BenchConfig("f", method="full"))
    assert all(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch_dtype(native_dtype(cpu))  # dtype auto: the CPU's native one

"""GGUF: the skip path without the extra, and with it the export checked against llama.cpp itself."""

from __future__ import annotations

import importlib.util

import pytest

from lorabench.kinds import gguf


def test_missing_extra_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    reason = gguf.skip_reason()
    assert reason is not None
    assert "llama_cpp, gguf" in reason and 'pip install "lorabench[gguf]"' in reason


def test_present_extra_gives_no_skip_reason(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert gguf.missing_modules() == [] and gguf.skip_reason() is None


def test_the_extra_is_declared_in_pyproject():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extra = " ".join(project["optional-dependencies"]["gguf"])
    assert "llama-cpp-python" in extra and "gguf" in extra


# ----- export and quantization: need the extra ------------------------------------------
needs_extra = pytest.mark.skipif(gguf.skip_reason() is not None, reason=gguf.skip_reason() or "")


@pytest.fixture(scope="module")
def llama_fp32(tiny_llama):
    """The embedded tiny Llama in fp32 with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama.path)


@pytest.fixture(scope="module")
def f32_file(llama_fp32, tmp_path_factory):
    model, tokenizer = llama_fp32
    return gguf.export_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "f32.gguf")


@needs_extra
def test_llama_cpp_computes_the_exported_model_s_logits(llama_fp32, f32_file):
    """Tensor names, the rotary reordering of q and k, and the hyper-parameters are right only if
    llama.cpp's forward pass gives the transformers model's logits."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    model, tokenizer = llama_fp32
    ids = tokenizer("Reverse the digits: 40718 ->")["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(str(f32_file), n_ctx=128, logits_all=True, verbose=False, seed=0)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@needs_extra
def test_llama_cpp_prints_the_tokens_as_the_tokenizer_does(llama_fp32, f32_file):
    from llama_cpp import Llama

    _, tokenizer = llama_fp32
    text = "Reverse the digits: 40718 -> 81704"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = Llama(str(f32_file), n_ctx=128, verbose=False, vocab_only=True)
    assert llm.detokenize(ids).decode() == tokenizer.decode(ids)
    llm.close()


@needs_extra
@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0"])
def test_quantized_files_shrink_as_their_bits_say(f32_file, quant):
    out = gguf.quantize_gguf(f32_file, f32_file.with_name(f"{quant}.gguf"), quant, threads=2)
    ratio = out.stat().st_size / f32_file.stat().st_size
    # against 32 bits a weight: Q8_0 stores 8.5, Q4_0 4.5 (its output layer Q6_K's 6.56)
    assert {"Q8_0": 0.24 <= ratio <= 0.30, "Q4_0": 0.13 <= ratio <= 0.20}[quant], ratio


@needs_extra
def test_an_unknown_quantization_is_named(f32_file):
    with pytest.raises(gguf.GGUFError, match="unknown GGUF quantization 'Q3_X'; known: Q4_0, Q8_0"):
        gguf.quantize_gguf(f32_file, f32_file.with_name("x.gguf"), "Q3_X", threads=1)


@needs_extra
def test_a_model_that_is_not_llama_is_refused_with_the_supported_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorabench.models.zoo import build_tokenizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=98))
    with pytest.raises(gguf.GGUFError, match="model_type 'gpt2' is not exported to GGUF here; exported: llama"):
        gguf.export_gguf(model, build_tokenizer(), tmp_path / "gpt2.gguf")
    assert not (tmp_path / "gpt2.gguf").exists()  # refused before anything is written

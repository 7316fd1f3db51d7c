"""Adapters: size on disk, logit comparison, and the save/reload/merge parity check on a real tiny model."""

from __future__ import annotations

import pytest
import torch

from lorabench.adapters import adapter_size_bytes, check_adapter, compare_logits, record_adapter
from lorabench.config import BenchConfig, resolve
from lorabench.models import apply_adapter, load_model, load_tokenizer
from lorabench.result import CaseResult


def test_compare_logits_reads_only_masked_positions():
    a = torch.zeros(1, 3, 4)
    b = a.clone()
    b[0, 2] = torch.tensor([0.0, 0.0, 0.0, 5.0])  # a padding position: differs, but is not compared
    b[0, 1, 0] = 0.25
    diff = compare_logits(a, b, torch.tensor([[1, 1, 0]]))
    assert diff.max_abs == pytest.approx(0.25)
    assert diff.argmax_agree_pct == 100.0  # argmax of [0.25, 0, 0, 0] is still index 0
    b[0, 0, 3] = 1.0
    assert compare_logits(a, b, torch.tensor([[1, 1, 0]])).argmax_agree_pct == 50.0


def test_compare_logits_rejects_mismatched_shapes_and_empty_masks():
    with pytest.raises(ValueError, match="different shapes"):
        compare_logits(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="no position"):
        compare_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2))


def test_adapter_size_needs_a_saved_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved peft adapter"):
        adapter_size_bytes(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert adapter_size_bytes(tmp_path) == 102


def test_full_fine_tuning_has_no_adapter_figures():
    result = CaseResult("c", "full_bf16", "m", "d", "cpu", {})
    record_adapter(result, None, reason="no adapter")
    assert "adapter_mib" not in result.metrics and result.absent["merge_max_abs_diff"] == "no adapter"


def _trained_looking_adapter(source, config, device):
    """A LoRA model whose B matrices are non-zero (as after training), seeded, without training."""
    model = apply_adapter(load_model(source, config, device).model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def parity(tiny_llama, cpu, tmp_path_factory):
    """check_adapter on a bf16 base and on an NF4 base, same seeded adapter values."""
    tokenizer = load_tokenizer(tiny_llama)
    batch = tokenizer(["rev 4821=", "rev 0093=", "c:1234>"], return_tensors="pt", padding=True)
    out = {}
    for quant in ("none", "nf4"):
        config = resolve(BenchConfig(f"p_{quant}", quant=quant, double_quant=quant == "nf4"), tiny_llama.defaults)
        model = _trained_looking_adapter(tiny_llama, config, cpu)
        directory = tmp_path_factory.mktemp(f"adapter-{quant}")
        out[quant] = (check_adapter(model, tiny_llama, config, cpu, dict(batch), directory), directory)
    return out


def test_reloaded_adapter_reproduces_the_trained_logits_exactly(parity):
    for check, directory in parity.values():
        assert check.reload.max_abs == 0.0 and check.reload.argmax_agree_pct == 100.0
        assert check.adapter_bytes == adapter_size_bytes(directory) > 0


def test_merging_into_bf16_changes_logits_by_rounding_only(parity):
    check, _ = parity["none"]
    assert 0.0 < check.merge.max_abs <= 0.25  # bf16 keeps 8 significant bits of W + BA
    assert check.merge.argmax_agree_pct >= 95.0


def test_merging_into_nf4_requantizes_and_adds_error(parity):
    # peft dequantizes, adds B A, and quantizes the sum to NF4 again: a fresh quantization error,
    # far above the bf16 rounding of the same merge.
    bf16, _ = parity["none"]
    nf4, _ = parity["nf4"]
    assert nf4.merge.max_abs > 4 * bf16.merge.max_abs

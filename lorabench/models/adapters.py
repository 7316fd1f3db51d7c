"""A trained adapter's life after training: save, reload onto a fresh base, merge, and check outputs.

After a LoRA case trains, :func:`check_adapter` saves the adapter with peft's
``save_pretrained`` (safetensors), reloads it with ``PeftModel.from_pretrained`` onto a
freshly loaded base prepared the same way, and compares the logits of the trained and
the reloaded model on held-out inputs (saving is lossless, so they agree exactly). It then
folds the adapter into the base with ``merge_and_unload`` and compares merged with
unmerged logits.

On an unquantized base, merging changes only the rounding: ``W + B A`` is stored in the
base dtype (bf16: 8 significant bits), where the unmerged model adds ``B A x`` in the
adapter's fp32. On a bitsandbytes base (NF4, FP4, int8), peft's merge
(``peft/tuners/lora/bnb.py``, ``Linear4bit.merge`` and ``Linear8bitLt.merge``) dequantizes
the base weight, adds the LoRA delta and *quantizes the sum again*: the merged model
carries a fresh quantization error of the same size as the original one, and peft warns
"Merge lora module to 4-bit linear may get different generations due to rounding errors".
The merged-vs-unmerged difference of a quantized base is therefore reported next to
top-1 agreement, and gated with its own, looser tolerance in ``thresholds.yaml``.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from lorabench.meters.footprint import MIB
from lorabench.models.loading import load_model, prepare_base

# Deferred imports: peft, torch inside the functions that use them: what only reads a configuration or a
# stored run starts without them.

SAFETENSORS_NAME = "adapter_model.safetensors"


@dataclass(frozen=True)
class LogitsDiff:
    """How far two models' logits are apart on the same inputs (real tokens only)."""

    max_abs: float  # largest absolute difference of any logit
    argmax_agree_pct: float  # share of positions whose greedy next token is the same


@dataclass(frozen=True)
class AdapterCheck:
    adapter_bytes: int
    reload: LogitsDiff
    merge: LogitsDiff
    check_s: float  # wall time of save + reload + merge + the three forward passes


def adapter_size_bytes(directory: str | Path) -> int:
    """Bytes on disk of a saved adapter: every file peft wrote (weights and ``adapter_config.json``).

    Raises:
        FileNotFoundError: the directory holds no safetensors adapter.
    """
    directory = Path(directory)
    if not (directory / SAFETENSORS_NAME).is_file():
        raise FileNotFoundError(f"{directory}: no {SAFETENSORS_NAME} (not a saved peft adapter)")
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def compare_logits(a, b, mask) -> LogitsDiff:
    """Compare two ``[batch, seq, vocab]`` logit tensors at the positions where ``mask`` is 1.

    Raises:
        ValueError: the shapes differ or the mask selects no position.
    """
    if a.shape != b.shape:
        raise ValueError(f"logits of different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    keep = mask.bool()
    if not keep.any():
        raise ValueError("the mask selects no position to compare")
    a, b = a[keep].float(), b[keep].float()
    max_abs = (a - b).abs().max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return LogitsDiff(max_abs, 100.0 * agree)


def logits(model, batch):
    """Logits of ``model`` in eval mode (no dropout), without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def check_adapter(model, source, config, device, batch, directory: str | Path) -> AdapterCheck:
    """Save ``model``'s adapter to ``directory``, reload it onto a fresh base, merge it, compare logits.

    Args:
        model: the trained ``PeftModel``.
        source: where its base came from (:class:`lorabench.models.loading.ModelSource`).
        config: the resolved configuration it trained with (quantization, dtype).
        device: where the model is.
        batch: held-out inputs (``input_ids``, ``attention_mask``) on ``device``.
        directory: where the adapter is saved (kept, so a caller can load it again).

    Returns:
        The adapter's size on disk and the reload and merge differences.
    """
    from peft import PeftModel


    started = time.perf_counter()
    model.save_pretrained(directory, safe_serialization=True)
    size = adapter_size_bytes(directory)
    trained = logits(model, batch)
    base = prepare_base(load_model(source, config, device).model, config)
    reloaded = PeftModel.from_pretrained(base, directory)
    unmerged = logits(reloaded, batch)
    reload_diff = compare_logits(trained, unmerged, batch["attention_mask"])
    with warnings.catch_warnings():  # peft's rounding warning for quantized bases: measured here instead
        warnings.filterwarnings("ignore", message="Merge lora module to .* rounding errors")
        merged = reloaded.merge_and_unload()
    merge_diff = compare_logits(unmerged, logits(merged, batch), batch["attention_mask"])
    return AdapterCheck(size, reload_diff, merge_diff, time.perf_counter() - started)


def record_adapter(result, check: AdapterCheck | None, *, reason: str = "") -> None:
    """Put an adapter check's figures into a :class:`lorabench.result.CaseResult` (absent with ``reason``)."""
    names = ("adapter_mib", "reload_max_abs_diff", "merge_max_abs_diff", "merge_argmax_agree_pct", "adapter_check_s")
    if check is None:
        for name in names:
            result.set(name, None, reason=reason)
        return
    result.set("adapter_mib", check.adapter_bytes / MIB, source="bytes on disk of peft save_pretrained (safetensors + config)")
    result.set("reload_max_abs_diff", check.reload.max_abs,
               source="max |logit| difference, trained vs reloaded onto a fresh base, held-out inputs")
    result.set("merge_max_abs_diff", check.merge.max_abs,
               source="max |logit| difference, merge_and_unload vs unmerged adapter, held-out inputs")
    result.set("merge_argmax_agree_pct", check.merge.argmax_agree_pct,
               source="positions whose greedy next token is the same, merged vs unmerged")
    result.set("adapter_check_s", check.check_s, source="wall clock: save, reload, merge and three forward passes")


CHECK_EXAMPLES = 32  # held-out rows whose logits are compared


def check_case_adapter(result, model, source, config, device, eval_tokens, collate, directory: str | Path | None = None) -> None:
    """After a case trains: run :func:`check_adapter` on held-out rows and record it in ``result``.

    Args:
        eval_tokens: the tokenized held-out split; its first :data:`CHECK_EXAMPLES` rows are used.
        directory: where to keep the adapter; a temporary directory (deleted after) when ``None``.
    """

    if config.method != "lora":
        record_adapter(result, None, reason="full fine-tuning trains every weight: there is no adapter to save or merge")
        return
    rows = [eval_tokens[i] for i in range(min(CHECK_EXAMPLES, len(eval_tokens)))]
    batch = {k: v.to(device) for k, v in collate(rows).items() if k != "labels"}
    if directory is not None:
        record_adapter(result, check_adapter(model, source, config, device, batch, directory))
        return
    with tempfile.TemporaryDirectory(prefix="lorabench-adapter-") as tmp:
        record_adapter(result, check_adapter(model, source, config, device, batch, tmp))

"""Run meta tensors through the kernels the target device would pick.

Most operators save the same tensors for backward on every device, so a meta run counts
what a CPU or CUDA run holds. Three choices depend on the device, and on the meta device
they would fall to a path that no real run takes:

- ``scaled_dot_product_attention``: the CPU picks its flash kernel (it saves the output and
  a float32 log-sum-exp per row), CUDA its flash or memory-efficient kernel (the same
  tensors); the meta device would take the math path, which materialises the
  ``batch x heads x length x length`` attention matrix. :func:`emulate` calls the fused
  kernel the target's dispatcher would choose, directly, and the math path only where
  the target falls back to it too (attention dropout on the CPU, an unsupported dtype).
- a quantization backend's device-dependent kernels (:meth:`lorabench.backends.QuantBackend.meta_patches`;
  LLM.int8 training dequantizes and calls a plain matmul on CPUs and runs ``MatMul8bitLt`` on CUDA;
  bitsandbytes' paged optimizers put large state buffers in CUDA managed memory).
- AdamW: torch runs the multi-tensor (``foreach``) implementation on CUDA and the
  per-parameter loop elsewhere; the optimizer is told which.

Two checks read values, which meta tensors do not have: transformers looks for several
sequences packed into one row of position ids, and some models (GPT-2) look for pad tokens
in a batch given without an attention mask, to warn. Whole rows of a training batch hold
neither, so for meta tensors the first answers "none" and the second stays quiet.
"""

from __future__ import annotations

import contextlib

from lorabench import backends
from lorabench.errors import ConfigError
import torch
import torch.nn.functional as F

# Deferred imports: transformers inside the functions that use them: what only reads a configuration or a
# stored run starts without them.

TARGETS = ("cpu", "cuda")
_HALF = ("float16", "bfloat16")


def check_target(target: str) -> None:
    """Fail on a target with no kernel model here.

    Raises:
        ConfigError: ``target`` is not one of :data:`TARGETS`.
    """
    if target not in TARGETS:
        raise ConfigError(f"target device {target!r}: choose one of {', '.join(TARGETS)}")


def _fused_sdpa(target: str, original):
    aten = torch.ops.aten

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        def fallback():
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)

        if query.device.type != "meta" or query.dim() != 4 or query.size(-1) != value.size(-1):
            return fallback()
        half = str(query.dtype).removeprefix("torch.") in _HALF
        if target == "cpu":
            if dropout_p > 0.0:  # torch's CPU flash kernel takes no dropout: the dispatcher falls back to math
                return fallback()
            return aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        if attn_mask is None and half and query.size(-1) <= 256:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                            scale=scale)[0]
        if query.size(1) == key.size(1):  # the memory-efficient kernel needs as many key as query heads
            return aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]
        return fallback()

    return sdpa


def _no_packed_rows(original):
    def find_packed_sequence_indices(position_ids):
        return None if position_ids.device.type == "meta" else original(position_ids)

    return find_packed_sequence_indices


def _quiet_for_meta(original):
    def warn_if_padding_and_no_attention_mask(self, input_ids, attention_mask):
        if input_ids is not None and input_ids.device.type == "meta":
            return None
        return original(self, input_ids, attention_mask)

    return warn_if_padding_and_no_attention_mask


@contextlib.contextmanager
def emulate(target: str):
    """Within: meta tensors take ``target``'s attention kernel and its quantization backends' kernels.

    Raises:
        ConfigError: ``target`` is not ``cpu`` or ``cuda``.
    """
    from transformers import PreTrainedModel, masking_utils


    check_target(target)
    patches = ((F, "scaled_dot_product_attention", _fused_sdpa(target, F.scaled_dot_product_attention)),
               *backends.meta_patches(target),
               (masking_utils, "find_packed_sequence_indices",
                _no_packed_rows(masking_utils.find_packed_sequence_indices)),
               (PreTrainedModel, "warn_if_padding_and_no_attention_mask",
                _quiet_for_meta(PreTrainedModel.warn_if_padding_and_no_attention_mask)))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def use_foreach(optimizer, target: str) -> None:
    """Make a torch optimizer take the implementation it would take on ``target`` (foreach on CUDA)."""
    check_target(target)
    groups = getattr(optimizer, "param_groups", [])
    for group in groups:
        if "foreach" in group and group["foreach"] is None:
            group["foreach"] = target == "cuda"

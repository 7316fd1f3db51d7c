"""A checkpoint directory checked before anything loads: whole weight files, a causal-LM architecture,
and weights that are the ones that architecture needs.

Only ``config.json``, the weight index, the safetensors headers and the zip directories of
``.bin`` files are read, never the weights themselves, so the check takes milliseconds
whatever the model's size.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from lorabench.errors import ModelError

# Deferred imports: safetensors, transformers inside the functions that use them: what only reads a
# configuration or a stored run starts without them.

# What from_pretrained looks for, in its order of preference.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
_PICKLE_MAGIC = b"\x80"  # torch's legacy (pre-zip) format starts with a pickle protocol byte


def check_weights(directory: Path, spec: str) -> None:
    """The directory holds weight files that are whole (complete headers and every byte they describe).

    Raises:
        ModelError: no weight file, a shard named by an index is missing, or a file is truncated.
    """
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        files = _index_shards(path, spec) if name.endswith(".index.json") else [path]
        for file in files:
            why = weight_file_problem(file)
            if why:
                raise ModelError(f"--model {spec}: {file.name}: {why}")
        return
    present = sorted(p.name for p in directory.iterdir())[:8]
    raise ModelError(f"--model {spec}: no weight files in the checkpoint directory (it needs one of "
                     f"{', '.join(WEIGHT_FILES)}; it holds {', '.join(present) or 'nothing'})")


def _index_shards(index: Path, spec: str) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"--model {spec}: {index.name} is not a weight index (JSON with a 'weight_map')") from None
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise ModelError(f"--model {spec}: {index.name} names {len(missing)} shard(s) that are not in the directory: "
                         f"{', '.join(missing[:4])}")
    return [index.parent / s for s in shards]


def weight_file_problem(path: Path) -> str | None:
    """Why a weight file cannot be whole, from its header alone; ``None`` when it looks whole."""
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if path.suffix == ".bin":
        with path.open("rb") as fh:
            head = fh.read(1)
        if head == _PICKLE_MAGIC:
            return None  # legacy format: nothing to check without unpickling
        if not zipfile.is_zipfile(path):
            return "not a whole torch archive (its zip directory is missing: truncated or not a weight file)"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Check a safetensors file against its own header: the header's length, its JSON, the data it describes."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        if size < 8:
            return f"truncated: {size} bytes, fewer than the 8-byte header length"
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > size - 8:
            return f"truncated: its header should take {header_len:,} bytes, the file has {size:,} in all"
        try:
            header: dict[str, Any] = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, ValueError):
            return "not a safetensors file (its header is not JSON)"
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        return "not a safetensors file (its header has no tensor offsets)"
    expected = 8 + header_len + end
    if size < expected:
        return f"truncated: {size:,} bytes, its header describes {expected:,}"
    return None


def check_causal_lm(config, spec: str) -> None:
    """A config that ``AutoModelForCausalLM`` loads as a decoder that predicts the next token.

    Raises:
        ModelError: the model type has no causal-LM class, the checkpoint's architectures are
            other heads (``BertForMaskedLM``), or an encoder's LM head would run without its
            causal mask (``is_decoder`` false).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    auto_map = getattr(config, "auto_map", None) or {}
    causal_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if causal_class is None and "AutoModelForCausalLM" in auto_map:
        return  # the checkpoint's own code says it is one (and runs only with --trust-remote-code)
    if causal_class is None:
        raise ModelError(f"--model {spec!r}: model type {config.model_type!r} is not a causal language model "
                         "(AutoModelForCausalLM cannot load it)")
    architectures = getattr(config, "architectures", None) or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelError(f"--model {spec!r}: the checkpoint is a {', '.join(architectures)}, not a causal language "
                         f"model (for {config.model_type!r} that would be {causal_class})")
    if getattr(config, "is_decoder", None) is False and _is_encoder_family(config.model_type):
        raise ModelError(f"--model {spec!r}: model type {config.model_type!r} is an encoder; its causal head "
                         f"({causal_class}) needs \"is_decoder\": true in config.json, or it reads every token "
                         "of a sequence, the future included")


def _is_encoder_family(model_type: str) -> bool:
    """An encoder (BERT, RoBERTa, ...) whose causal head is the encoder run with a causal mask."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


# legacy parameter names transformers still loads under their current names (old LayerNorm checkpoints)
_LEGACY_SUFFIXES = ((".gamma", ".weight"), (".beta", ".bias"))
SHOWN_NAMES = 3  # names a refusal lists, of each kind


def stored_tensors(directory: Path) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every tensor in the checkpoint's safetensors files (the index's shards, or
    ``model.safetensors``), read from their headers alone.

    Returns:
        ``None`` where the weights are not safetensors (a ``.bin`` cannot be listed without unpickling it).
    """
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as fh:
            for key in fh.keys():
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    for legacy, current in _LEGACY_SUFFIXES:
        shapes.update({k[: -len(legacy)] + current: v for k, v in list(shapes.items()) if k.endswith(legacy)})
    return shapes


def check_covers_architecture(model, stored: dict[str, tuple[int, ...]], spec: str, renamed: bool = False) -> None:
    """The checkpoint's tensors are the architecture's: each parameter and persistent buffer of ``model``
    (built on the meta device from config.json) is stored under its name, with its shape. Tied weights
    (an output layer sharing the embedding) need one of their names; a name may lack or carry the
    base model's prefix (``model.``), as transformers loads either; the class's own list of keys that
    may be missing is honoured.

    Args:
        renamed: transformers converts this model type's checkpoint names when it loads them (MoE experts
            stored one by one, fused in the model): then only a checkpoint that holds none of the
            architecture's tensors is refused.

    Raises:
        ModelError: naming the first missing tensors and the first tensors the checkpoint holds instead,
            or the first tensor whose shape differs.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    may_miss = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    names_of: dict[int, list[str]] = {}
    shape_of: dict[int, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
        shape_of[id(tensor)] = tuple(tensor.shape)

    def stored_name(name: str) -> str | None:
        bare = name[len(prefix) + 1:] if prefix and name.startswith(f"{prefix}.") else name
        return next((k for k in (name, bare, f"{prefix}.{name}") if k in stored), None)

    missing, found, used = [], 0, set()
    for key, names in names_of.items():
        hits = [(n, s) for n in names if (s := stored_name(n))]
        if not hits:
            if not any(p.search(n) for p in may_miss for n in names):
                missing.append(names[0])
            continue
        at = hits[0][1]
        found += 1
        used.update(s for _, s in hits)
        if stored[at] != shape_of[key] and not renamed:
            raise ModelError(f"--model {spec}: tensor {at} has shape {list(stored[at])} in the checkpoint, but the "
                             f"{type(model).__name__} its config.json describes needs {list(shape_of[key])}; the "
                             "weights are not this model's (another size or a different config.json)")
    if not missing or (renamed and found):
        return
    others = sorted(set(stored) - used)
    holds = (f"; it holds {len(others)} other tensor(s), first {', '.join(others[:SHOWN_NAMES])}" if others else "")
    raise ModelError(f"--model {spec}: the checkpoint lacks {len(missing)} of the {len(names_of)} tensors of the "
                     f"{type(model).__name__} its config.json describes, first {', '.join(missing[:SHOWN_NAMES])}"
                     f"{holds}; training would start from random weights there. Use the weights saved with this "
                     "config.json")


def remote_code_problem(directory: Path, trust_remote_code: bool) -> str | None:
    """Why transformers cannot read a config.json that names its own code (``auto_map``) for a model type
    it does not know, in the checkpoint's terms; ``None`` where that is not the reason.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    if not isinstance(auto_map, dict) or raw.get("model_type") in CONFIG_MAPPING_NAMES:
        return None
    if "AutoConfig" not in auto_map:
        return (f"model type {raw.get('model_type')!r} is not one transformers knows, and the auto_map of config.json "
                f"({', '.join(auto_map)}) names no AutoConfig class, so the checkpoint's own code cannot read it either, "
                "with or without --trust-remote-code; add \"AutoConfig\" to auto_map")
    if not trust_remote_code:
        return ("the checkpoint ships its own modelling code (auto_map in config.json), which runs only with "
                "--trust-remote-code; read that code, then pass --trust-remote-code to allow it")
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    files = sorted({r.split(".")[0] + ".py" for r in refs if "--" not in r})  # 'org/repo--module.Class': another repo
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        return (f"the auto_map of config.json names code in {', '.join(missing)}, which is not in the checkpoint "
                "directory; copy the checkpoint's .py files with it")
    return None

"""A model's ``config.json`` checked before a memory prediction: the fields that shape its tensors.

transformers fills a missing field with its class default (a Llama without ``hidden_size`` becomes
4096 wide), accepts a negative width, and fails deep inside with a ``ZeroDivisionError`` or a
validation message for others. A prediction from such a config would be for another model, or
none at all, so each field is checked as the file gives it, and a bad one is named with what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorabench.errors import ModelError

# the fields every prediction needs, each with the names model families give it in config.json
REQUIRED = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size",),
}
# fields that, where given (not null), must be whole numbers above 0 too
OPTIONAL = ("intermediate_size", "n_inner", "num_key_value_heads", "head_dim", "max_position_embeddings")


def read_config(path: Path) -> dict[str, Any]:
    """The fields of ``path`` (a ``config.json``), checked.

    Raises:
        ModelError: not a JSON object, or a shape field missing or out of range (:func:`check_fields`).
    """
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ModelError(f"{path}: expected a JSON object of model fields, got {type(fields).__name__}")
    check_fields(fields, str(path))
    return fields


def _given(fields: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    for name in names:
        if fields.get(name) is not None:
            return name, fields[name]
    return None


def _whole_above_zero(where: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{where}: {name} {value!r}: must be a whole number above 0")
    return value


def check_fields(fields: dict[str, Any], where: str) -> None:
    """Refuse a config whose tensor shapes would be wrong or undefined.

    Raises:
        ModelError: naming ``where`` (the file), the field, its value and what is allowed.
    """
    sizes = {}
    for field, names in REQUIRED.items():
        given = _given(fields, names)
        if given is None:
            also = f" (nor {', '.join(names[1:])})" if len(names) > 1 else ""
            raise ModelError(f"{where}: no {field}{also}: a prediction would be for transformers' default of "
                             f"that family, not this model; add the model's {field}")
        sizes[field] = _whole_above_zero(where, given[0], given[1])
    for name in OPTIONAL:
        if fields.get(name) is not None:
            sizes[name] = _whole_above_zero(where, name, fields[name])
    heads = sizes["num_attention_heads"]
    if "head_dim" not in sizes and sizes["hidden_size"] % heads:
        raise ModelError(f"{where}: hidden_size {sizes['hidden_size']} is not divisible by num_attention_heads "
                         f"{heads}: each head takes hidden_size / num_attention_heads dimensions; give head_dim, "
                         "or sizes that divide")
    kv = sizes.get("num_key_value_heads")
    if kv is not None and heads % kv:
        raise ModelError(f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}: "
                         "each key/value head serves a whole group of query heads")

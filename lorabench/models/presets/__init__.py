"""Real architectures as their public ``config.json`` numbers, without weights.

Each ``NAME.json`` here holds the fields of the model's ``config.json`` on the Hugging Face
hub that shape its tensors (sizes, heads, vocabulary, tying, rope), with ``_source``
naming the file it was taken from. ``preset:NAME`` works wherever a model is named for
a memory prediction (``python -m lorabench fit --model preset:llama-3.1-8b``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorabench.errors import ModelError

# Deferred imports: transformers inside the functions that use them: what only reads a configuration or a
# stored run starts without them.

PREFIX = "preset:"
_DIR = Path(__file__).parent


def names() -> list[str]:
    """Every preset name, sorted."""
    return sorted(p.stem for p in _DIR.glob("*.json"))


def is_preset(spec: str) -> bool:
    return spec.startswith(PREFIX)


def raw(name: str) -> dict[str, Any]:
    """The preset's fields as shipped, ``_source`` included.

    Raises:
        ModelError: no preset of that name.
    """
    path = _DIR / f"{name}.json"
    if not path.is_file():
        raise ModelError(f"--model {PREFIX}{name}: no such preset; known: {', '.join(names())}")
    return json.loads(path.read_text())


def hf_config(spec: str):
    """The transformers config of ``preset:NAME`` (or a bare ``NAME``).

    Raises:
        ModelError: no preset of that name.
    """
    from transformers import AutoConfig

    name = spec.removeprefix(PREFIX)
    fields = {k: v for k, v in raw(name).items() if not k.startswith("_")}
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)

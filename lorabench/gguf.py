"""GGUF (llama.cpp) variants of the merged model: what the optional extra needs.

Exporting the merged model to GGUF and timing Q4_0 and Q8_0 through llama-cpp-python
needs the ``gguf`` extra, which compiles llama.cpp on install. Without it the ``gguf``
bench cases are skipped with :data:`INSTALL_HINT`.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = 'pip install "lorabench[gguf]"  (llama-cpp-python compiles llama.cpp: many minutes on a small CPU)'
REQUIRED_MODULES = ("llama_cpp", "gguf")


def missing_modules() -> list[str]:
    """The modules of the ``gguf`` extra that cannot be imported here."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def skip_reason() -> str | None:
    """Why the GGUF cases cannot run here (naming the missing modules and the install command), or ``None``."""
    missing = missing_modules()
    if missing:
        return f"the gguf extra is not installed (no {', '.join(missing)}): {INSTALL_HINT}"
    return None

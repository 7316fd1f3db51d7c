"""Library noise below ``-v``: progress bars, deprecation notices and log warnings of torch and the Hugging Face stack.

A benchmark's terminal should show the benchmark: its progress lines, its summary, and a readable
block per failed case. ``-v`` leaves every library message as it is. The pytest plugin sets
:data:`QUIET_ENV` for the session before it imports this module; case processes (lorabench.isolation)
start from a forkserver that imports this module first, so the same setting quiets them before torch
and bitsandbytes are imported.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

QUIET_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub")
QUIET_WARNINGS = (FutureWarning, DeprecationWarning)
QUIET_ENV = "LORABENCH_QUIET"


def quiet_libraries() -> list[str]:
    """Switch off the libraries' progress bars, deprecation warnings and log messages below ERROR in this
    process and the case processes it starts.

    Returns:
        The same warning filters as pytest ``filterwarnings`` lines (pytest resets Python's filters for
        each test and applies its own).
    """
    # Read at import by huggingface_hub (and so transformers) and datasets; case processes inherit them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: switch its bars off directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    modules = f"({'|'.join(QUIET_LIBRARIES)})"
    for category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=modules)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    return [f"ignore::{category.__name__}:{modules}" for category in QUIET_WARNINGS]


if os.environ.get(QUIET_ENV) == "1":  # set by the pytest plugin for a quiet session (see the module docstring)
    quiet_libraries()

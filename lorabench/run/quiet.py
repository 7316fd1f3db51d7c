"""Keep library chatter out of the run's output, in the pytest process and in every case process.

Loading bars written with carriage returns turn into one long garbled line in CI logs, and
notices that repeat for every case (a deprecated attribute inside transformers, bitsandbytes'
optional CPU kernel that would be fetched from a hub) say nothing about the measurement.
Imported first: by the pytest plugin, and by the forkserver that case processes start from.

Below ``-v`` (:func:`quiet_libraries`, called by the pytest plugin) every deprecation notice and
log message below ERROR of torch and the Hugging Face stack is hidden too, so the terminal shows
the bench's own progress, summary and failure blocks; ``-v`` shows them. Case processes get the
same: lorabench.run.isolation starts their forkserver with :data:`QUIET_ENV` set (only while it starts
it, so no other subprocess inherits it), and this module, imported first there, applies it before
torch and the libraries print anything at import.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

QUIET_LIBRARIES = ("torch", "torchao", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
                   "huggingface_hub")
QUIET_WARNINGS = (FutureWarning, DeprecationWarning)
QUIET_ENV = "LORABENCH_QUIET"  # "1" in the environment of a case processes' forkserver started below -v

# huggingface_hub and transformers read this when they are imported: no "Loading weights" bars
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# the optional gemm_4bit kernel for AVX512-BF16 CPUs comes from a hub, which runs here are offline from
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


def quiet_libraries() -> list[str]:
    """Hide the libraries' progress bars, deprecation warnings and log messages below ERROR in this process.

    Returns:
        The same warning filters as pytest ``filterwarnings`` lines (pytest resets Python's filters for
        each test and applies its own).
    """
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_LOGS", "-all")  # torch resets its loggers when imported; this sets them to ERROR
    if "transformers" in sys.modules:  # imported before HF_HUB_DISABLE_PROGRESS_BARS was read: switch it off here
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    modules = f"({'|'.join(QUIET_LIBRARIES)})"
    for category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=modules)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    return [f"ignore::{category.__name__}:{modules}" for category in QUIET_WARNINGS]


if os.environ.get(QUIET_ENV) == "1":  # a case processes' forkserver of a session below -v
    quiet_libraries()


class OwnRecordsOnly(logging.Filter):
    """Below ``-v``, for pytest's live log and captured-log sections: lorabench's records at any level, every
    other logger's from ERROR up. A filter on the handler holds where a library resets its own loggers'
    levels when imported (torch does)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".", 1)[0] == "lorabench" or record.levelno >= logging.ERROR

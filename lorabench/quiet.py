"""Keep library chatter out of the run's output, in the pytest process and in every case process.

Loading bars written with carriage returns turn into one long garbled line in CI logs, and
notices that repeat for every case (a deprecated attribute inside transformers, bitsandbytes'
optional CPU kernel that would be fetched from a hub) say nothing about the measurement.
Imported first: by the pytest plugin, and by the forkserver that case processes start from.
"""

from __future__ import annotations

import logging
import os
import warnings

# huggingface_hub and transformers read this when they are imported: no "Loading weights" bars
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# the optional gemm_4bit kernel for AVX512-BF16 CPUs comes from a hub, which runs here are offline from
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)

"""lorabench: a pytest benchmark suite for LoRA and QLoRA fine-tuning."""

import os

# Offline unless the user says otherwise (HF_HUB_OFFLINE=0): the embedded default never needs
# the network, and a hub id must come from the local cache. Set before any Hugging Face
# library is imported, since they read these once at import.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

__version__ = "0.1.0"

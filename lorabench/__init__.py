"""lorabench: a pytest benchmark suite for LoRA and QLoRA fine-tuning."""

import os
import sys

# Offline unless the user says otherwise (HF_HUB_OFFLINE=0): the embedded default never needs
# the network, and a hub id must come from the local cache. Set before any Hugging Face
# library is imported, since they read these once at import. An empty value says nothing, so it
# counts as unset (otherwise the hub reads it as "online": bitsandbytes' CPU backend then asks the
# hub for a kernel, through the `kernels` package, at import).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    if not os.environ.get(_var):
        os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

# Idle OpenMP threads sleep instead of spinning. On a shared CPU a thread that waits at a barrier
# for a partner the scheduler took away spins for the whole time slice it is away, so every
# figure of the step (wall and CPU time alike) measured the machine's load: under a CPU hog the
# case's CPU time per step grew 4x with spinning waits and 3% with passive ones (docs/benchmarks.md).
# OpenMP reads this once, when torch loads it: set before torch is imported, or it does nothing.
# (False when torch came first and the variable was not already set: the runtime's default applies.)
OMP_WAIT_POLICY_APPLIED = "torch" not in sys.modules or "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

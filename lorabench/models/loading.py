"""Models: resolve a ``--model`` spec, load it (quantized by its backend, :mod:`lorabench.backends`), attach the adapter.

The embedded zoo, a local checkpoint directory and a hub id from the local cache
all go through the same ``AutoModelForCausalLM.from_pretrained`` call; only where
the checkpoint comes from differs.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorabench import backends
from lorabench.models.checkpoints import check_causal_lm, check_weights, remote_code_problem
from lorabench.config import BenchConfig, TrainDefaults
from lorabench.errors import ConfigError, ModelError
from lorabench.paths import expand, require
from lorabench.backends.precision import resolve_dtype, torch_dtype
from lorabench.models import real_model
from lorabench.models.zoo import ZOO, checkpoint_dir

# Deferred imports: huggingface_hub, peft, torch, transformers inside the functions that use them: what only
# reads a configuration or a stored run starts without them.

# Defaults for a real checkpoint, where the configuration leaves them open.
CHECKPOINT_TRAIN_DEFAULTS = TrainDefaults(steps=100, batch_size=4, seq_len=512, lr_full=2e-5, lr_lora=2e-4)
_ATTENTION_PARENT = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)(\.|$)")


def train_defaults(spec: str) -> TrainDefaults:
    """The hyper-parameters ``--model spec`` brings where a configuration leaves them open, without
    building or resolving it: a zoo model's, the embedded real model's, or any checkpoint's.

    The one place this is decided: :func:`resolve_model` puts it into the source every case resolves
    with, and the session's checks and ``lorabench fit`` ask it for models not resolved yet.
    """
    if spec in ZOO:
        return ZOO[spec].defaults
    if spec in real_model.REAL_MODELS:
        return real_model.REAL_MODELS[spec].defaults
    return CHECKPOINT_TRAIN_DEFAULTS


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from."""

    spec: str  # what the user passed
    path: str  # what from_pretrained receives
    embedded: bool
    defaults: TrainDefaults
    trust_remote_code: bool = False


def resolve_model(spec: str, *, trust_remote_code: bool = False, weights: bool = True) -> ModelSource:
    """Turn a ``--model`` value into a loadable source the way Hugging Face resolves a name, checking it is a causal LM.

    In order: a zoo name (``tiny-llama``); an embedded real model (``smollm2-135m``,
    :mod:`lorabench.models.real_model`); an existing directory, which is a checkpoint; a hub id
    (``org/name``, dots and dashes allowed, ``org/name@revision`` for a branch, tag or commit),
    which is looked up in the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and
    loaded from its snapshot folder. Runs are offline, so nothing is downloaded.

    Args:
        spec: what the user passed to ``--model``.
        trust_remote_code: allow the checkpoint's own modelling code (off unless the user asks).
        weights: check that the checkpoint has weight files (a memory prediction reads the config alone).

    Raises:
        ModelError: the directory is missing or not a checkpoint, the hub id is malformed or not
            in the local cache, or the model is not a causal LM.
    """
    if spec in ZOO:
        return ModelSource(spec, str(checkpoint_dir(spec)), True, train_defaults(spec))
    if spec in real_model.REAL_MODELS:  # converted once from its GGUF, then an ordinary checkpoint
        return ModelSource(spec, str(real_model.checkpoint_dir(spec)), True, train_defaults(spec))
    path = expand(spec, "--model", ModelError)
    if os.path.lexists(path) or _looks_like_path(spec):
        require(path, "directory", "--model", ModelError)
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {spec}: directory has no config.json, so it is not a Hugging Face checkpoint")
        _check_causal_lm(spec, str(path), trust_remote_code)
        if weights:
            check_weights(path, spec)
        return ModelSource(spec, str(path), False, train_defaults(spec), trust_remote_code)
    snapshot = hub_snapshot(spec)
    _check_causal_lm(spec, snapshot, trust_remote_code)
    if weights:
        check_weights(Path(snapshot), spec)
    return ModelSource(spec, snapshot, False, train_defaults(spec), trust_remote_code)


def _looks_like_path(spec: str) -> bool:
    """A spec written as a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) rather than ``org/name[@rev]``."""
    repo = spec.split("@", 1)[0]
    return spec.startswith((".", "/", "~")) or "\\" in spec or repo.count("/") > 1


def split_hub_id(spec: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); the revision is ``None`` when not given.

    Raises:
        ModelError: the id is not a valid hub repository id.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo, _, revision = spec.partition("@")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise ModelError(
            f"--model {spec!r}: not an embedded model ({', '.join([*ZOO, *real_model.REAL_MODELS])}), not an existing directory, and not a hub "
            f"id of the form ORG/NAME or ORG/NAME@REVISION ({exc})"
        ) from None
    if spec.endswith("@"):
        raise ModelError(f"--model {spec!r}: empty revision after '@'; write ORG/NAME@REVISION or leave '@' out")
    return repo, revision or None


def hub_snapshot(spec: str) -> str:
    """The snapshot folder of a hub id in the local Hugging Face cache (nothing is downloaded).

    Raises:
        ModelError: the id is malformed, or that repository and revision are not in the local cache;
            the message says how to fetch it.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = split_hub_id(spec)
    try:
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        fetch = f"{repo}" + (f" --revision {revision}" if revision else "")
        zoo = "" if "/" in repo else f"not an embedded model ({', '.join([*ZOO, *real_model.REAL_MODELS])}) and "
        cache = str(constants.HF_HUB_CACHE)
        if cache.startswith(str(Path.home())):
            cache = "~" + cache[len(str(Path.home())):]
        raise ModelError(
            f"--model {spec!r}: {zoo}not in the local Hugging Face cache{at} ({cache}); runs are "
            f"offline. Fetch it on a machine with network with `huggingface-cli download {fetch}` (or `hf download "
            f"{fetch}`) and copy the cache here, or point HF_HOME at a cache that holds it"
        ) from None


def _check_causal_lm(spec: str, path: str, trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError or KeyError by case
        text = str(exc)
        why = remote_code_problem(Path(path), trust_remote_code)
        if why:
            raise ModelError(f"--model {spec}: {why}") from None
        first = text.splitlines()[0] if text else "no reason given"
        raise ModelError(f"--model {spec!r}: cannot read its config.json ({path}): {type(exc).__name__}: {first}") from None
    check_causal_lm(config, spec)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    load_s: float


def load_tokenizer(source: ModelSource):
    """The checkpoint's tokenizer, with a pad token (the EOS token where it has none).

    Raises:
        ModelError: the checkpoint has no loadable tokenizer, or one with neither a pad nor an EOS token.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, local_files_only=True, trust_remote_code=source.trust_remote_code
        )
    except Exception as exc:  # transformers raises OSError, ValueError or KeyError by case
        raise ModelError(f"--model {source.spec}: no usable tokenizer in the checkpoint (it needs tokenizer.json, or a "
                         f"tokenizer_config.json with its vocabulary files): {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"--model {source.spec}: the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, config: BenchConfig, device) -> LoadedModel:
    """Load the base model as the configuration asks, timing load plus quantization.

    Raises:
        ConfigError: the configuration's dtype or quantization is not usable on ``device``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = config.replace(dtype=resolve_dtype(config.dtype, device))
    check_dtype_supported(config.dtype, device)
    backends.check_runnable(config.quant, device)
    tokenizer = load_tokenizer(source)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        dtype=torch_dtype(config.dtype),
        quantization_config=quantization_config(config),
        device_map={"": (device.index or 0) if device.type == "cuda" else "cpu"},
        local_files_only=True,
        trust_remote_code=source.trust_remote_code,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - started
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, load_s)


def quantization_config(config: BenchConfig, *, skip_modules=()) -> Any:
    """The backend's load config of a base as ``config`` asks (``None`` for an unquantized base): every
    kind loads its base through this, so a format, its compute dtype and its double quantization mean
    the same everywhere.

    Args:
        config: a configuration whose ``dtype`` is resolved (the layers compute in it).
        skip_modules: modules to leave unquantized (a new classification head).

    Raises:
        ConfigError: unknown ``quant``, or its library is not installed.
    """
    return backends.quantization_config(config.quant, compute_dtype=torch_dtype(config.dtype),
                                        double_quant=config.double_quant, skip_modules=skip_modules)


def lora_config(config: BenchConfig, target_modules, *, task_type: str = "CAUSAL_LM"):
    """peft's ``LoraConfig`` of an adapter as ``config`` asks (rank, alpha, dropout), on ``target_modules``.

    Args:
        target_modules: the module names (or peft's ``"all-linear"``) the adapter wraps.
        task_type: peft's task (``CAUSAL_LM``; ``SEQ_CLS`` keeps a classification head trainable).
    """
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=target_modules, task_type=task_type)


def check_dtype_supported(dtype: str, device) -> None:
    """Fail early, with the reason, where a device cannot compute in ``dtype``."""
    import torch

    if device.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"dtype='bf16' is not supported on {torch.cuda.get_device_name(device)}; use dtype=fp16 (--set dtype=fp16)"
        )


def attention_module_names(model) -> list[str]:
    """Names of the linear layers inside attention blocks, for ``target_modules: attention``."""
    names = []
    linear_types = backends.linear_type_names()
    for name, module in model.named_modules():
        is_linear = type(module).__name__ in linear_types
        if is_linear and _ATTENTION_PARENT.search(name.rsplit(".", 1)[0]):
            names.append(name)
    if not names:
        raise ModelError(f"{type(model).__name__}: found no linear layers inside attention blocks")
    return names


def prepare_base(model, config: BenchConfig):
    """Ready a loaded base for a LoRA adapter as the configuration asks (k-bit preparation, checkpointing).

    A base that an adapter is reloaded onto goes through the same preparation, so that it
    computes exactly what the trained one did.
    """
    from peft import prepare_model_for_kbit_training

    checkpointing_kwargs = {"use_reentrant": False}
    if config.quantized:
        backends.backend_for(config.quant).prepare_for_training(model)
        # Freezes the base, readies inputs for checkpointing, and on a bitsandbytes base casts norms and
        # embeddings to fp32 (QLoRA practice; peft leaves the dtypes of other backends' bases alone).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    return model


def apply_adapter(model, config: BenchConfig):
    """Make the model trainable as the configuration asks: every weight, or a LoRA adapter."""
    from peft import get_peft_model

    if config.method == "full":
        model.requires_grad_(True)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    model = prepare_base(model, config)
    if config.target_modules == "attention":
        targets: Any = attention_module_names(model)
    elif isinstance(config.target_modules, tuple):
        targets = list(config.target_modules)
    else:
        targets = config.target_modules
    lora = lora_config(config, targets)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"configuration {config.id!r}: target_modules={config.target_modules!r}: {exc}") from None


def resolve_device(choice: str):
    """``auto`` picks CUDA when present, else the CPU.

    Raises:
        ConfigError: an unknown choice, or ``cuda`` asked for where none is present.
    """
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {choice}: no CUDA device is available here (torch {torch.__version__})")
        return torch.device(choice)
    raise ConfigError(f"--device {choice!r}: use auto, cpu, cuda or cuda:N")

"""Preflight: what a run would trip over after training, checked before any case trains.

Each check reads only what is cheap: a model's config and module names (built on the
``meta`` device, no weights), its tokenizer, the data set's token lengths, and the
directories a run writes to (a probe file created and removed, free bytes). Each refusal
names the input and what is allowed; what is worth knowing but not wrong is returned
as a notice for the terminal.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorabench.data.chat import prompt_token_ids
from lorabench.config import BenchConfig
from lorabench.errors import ConfigError, StorageError
from lorabench.models.checkpoints import check_covers_architecture, stored_tensors
from lorabench.models.loading import _ATTENTION_PARENT
from lorabench.models.loading import load_tokenizer
from lorabench.models.zoo import ZOO
from lorabench.models.zoo import ZOO, build_tokenizer, model_config
from lorabench.models.zoo import cache_root

# Deferred imports: torch, transformers inside the functions that use them: what only reads a configuration
# or a stored run starts without them.

log = logging.getLogger("lorabench.preflight")

# Layer types a LoRA adapter can wrap (peft's LoRA layers, under their class names).
LORA_LAYER_TYPES = frozenset({"Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention"})
# What one case adds to the run's outputs, at most: its record in the stored run and in
# --benchmark-json (the loss and step curves, every metric, the gates: about 12 KiB a case in the
# runs stored here, e.g. tests/data/stored-run.json, 3 cases in 34 KiB), and its TensorBoard or
# Allure files. 4 MiB leaves a wide margin for long runs and big attachments.
OUTPUT_BYTES_PER_CASE = 4 * 2**20
OUTPUT_BYTES_FLOOR = 32 * 2**20  # the report, plots and the JSON's fixed part


@dataclass
class ModelFacts:
    """What preflight knows of a model without loading its weights."""

    spec: str
    config: Any  # transformers PretrainedConfig
    tokenizer: Any
    modules: dict[str, str]  # module name -> class name

    @property
    def max_positions(self) -> int | None:
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def model_facts(spec: str, source=None, *, trust_remote_code: bool = False) -> ModelFacts:
    """Config, tokenizer and module names of ``--model spec``; a zoo model is not built for it.

    Args:
        source: the resolved :class:`~lorabench.models.loading.ModelSource` (``None`` for a zoo model).
    """
    from transformers import AutoConfig


    if spec in ZOO:
        return _zoo_facts(spec)
    tokenizer = load_tokenizer(source)
    config = AutoConfig.from_pretrained(source.path, local_files_only=True, trust_remote_code=trust_remote_code)
    model = _meta_model(config, trust_remote_code)
    _check_weights_are_the_models(model, config, Path(source.path), spec)
    return ModelFacts(spec, config, tokenizer, _module_types(model))


@functools.lru_cache(maxsize=None)
def _zoo_facts(name: str) -> ModelFacts:
    tokenizer = build_tokenizer()
    config = model_config(ZOO[name], tokenizer)
    return ModelFacts(name, config, tokenizer, _module_types(_meta_model(config, False)))


def _meta_model(config, trust_remote_code: bool):
    """The model a config describes, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _module_types(model) -> dict[str, str]:
    """Module name -> class name."""
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def _check_weights_are_the_models(model, config, directory: Path, spec: str) -> None:
    """The checkpoint's safetensors hold the tensors of the architecture its config.json describes.

    Pre-quantized checkpoints (a ``quantization_config``) store packed tensors under other names and
    shapes, and ``.bin`` weights cannot be listed without unpickling them: neither is checked here.

    Raises:
        ModelError: as :func:`lorabench.models.checkpoints.check_covers_architecture`.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping


    if getattr(config, "quantization_config", None):
        return
    stored = stored_tensors(directory)
    if stored is not None:
        check_covers_architecture(model, stored, spec,
                                  renamed=get_checkpoint_conversion_mapping(config.model_type) is not None)


def check_target_modules(config: BenchConfig, facts: ModelFacts) -> None:
    """Every module name a LoRA configuration lists is a layer of the model that LoRA can adapt.

    Raises:
        ConfigError: a name matches no module, or only modules LoRA cannot wrap.
    """
    if config.method == "full" or config.target_modules == "all-linear":
        return
    where = f"configuration {config.id!r} on --model {facts.spec}"
    if config.target_modules == "attention":
        if not any(t in LORA_LAYER_TYPES and _in_attention(n) for n, t in facts.modules.items()):
            raise ConfigError(f"{where}: target_modules='attention' finds no linear layer inside an attention block")
        return
    leaves = sorted({n.rsplit(".", 1)[-1] for n, t in facts.modules.items() if t in LORA_LAYER_TYPES})
    for wanted in config.target_modules:
        matched = {n: t for n, t in facts.modules.items() if n == wanted or n.endswith(f".{wanted}")}
        if not matched:
            raise ConfigError(f"{where}: target_modules names {wanted!r}, which is no module of the model; "
                              f"its adaptable layers are named {', '.join(leaves)}")
        if not any(t in LORA_LAYER_TYPES for t in matched.values()):
            kinds = ", ".join(sorted(set(matched.values())))
            raise ConfigError(f"{where}: target_modules names {wanted!r}, a {kinds}, which LoRA cannot adapt; "
                              f"name layers such as {', '.join(leaves[:6])}")


def _in_attention(name: str) -> bool:
    return _ATTENTION_PARENT.search(name.rsplit(".", 1)[0]) is not None


@dataclass(frozen=True)
class TokenLengths:
    """Token counts of a data set's rows under one tokenizer, as :func:`lorabench.data.tasks.tokenize` builds them."""

    train_prompt: list[int]
    eval_prompt: list[int]
    train_total: list[int]
    eval_total: list[int]


def token_lengths(task, tokenizer) -> TokenLengths:
    """Prompt and whole-row lengths in tokens (prompts count 0 for plain text rows, which train on every token)."""

    def lengths(ds) -> tuple[list[int], list[int]]:
        if "prompt" in ds.column_names:
            prompt = [len(ids) for ids in prompt_token_ids(tokenizer, list(ds["prompt"]))]
            answer = [len(ids) + 1 for ids in tokenizer(list(ds["completion"]), add_special_tokens=False)["input_ids"]]
            return prompt, [p + a for p, a in zip(prompt, answer)]
        text = [len(ids) + 1 for ids in tokenizer(list(ds["text"]))["input_ids"]]
        return [0] * len(text), text

    train_prompt, train_total = lengths(task.train)
    eval_prompt, eval_total = lengths(task.eval)
    return TokenLengths(train_prompt, eval_prompt, train_total, eval_total)


def check_lengths(config: BenchConfig, lengths: TokenLengths, facts: ModelFacts, dataset: str) -> list[str]:
    """``seq_len`` against the model's positions and the data's prompts, and the batch against the rows.

    Args:
        config: resolved (``seq_len`` and ``batch_size`` set).

    Returns:
        Notices: rows that will be left out because their prompt fills ``seq_len``.

    Raises:
        ConfigError: ``seq_len`` past the model's positions where a row is that long, a split left
            with no row to learn from or score, or ``batch_size`` above the training rows.
    """
    where = f"configuration {config.id!r} on --model {facts.spec}, --dataset {dataset}"
    seq_len, notices = config.seq_len, []
    longest = max(lengths.train_total + lengths.eval_total)
    positions = facts.max_positions
    if positions is not None and seq_len > positions and longest > positions:
        raise ConfigError(f"{where}: seq_len={seq_len} exceeds the model's {positions} positions and the longest row "
                          f"has {longest} tokens; use --set seq_len={positions} or less")
    kept_train = 0
    for split, prompts in (("training", lengths.train_prompt), ("eval", lengths.eval_prompt)):
        # a row is cut to seq_len tokens; one whose prompt fills them keeps no completion token to learn or score
        cut = [i for i, p in enumerate(prompts) if p >= seq_len]
        kept = len(prompts) - len(cut)
        if kept == 0:
            raise ConfigError(f"{where}: seq_len={seq_len} leaves no completion token in any {split} row (the shortest "
                              f"prompt has {min(prompts)} tokens); use --set seq_len={min(prompts) + 1} or more, up "
                              f"to the longest row's {longest}")
        if cut:
            notices.append(f"{where}: {len(cut)} of {len(prompts)} {split} rows have a prompt of seq_len={seq_len} "
                           f"tokens or more and are left out (no completion token left)")
        if split == "training":
            kept_train = kept
    if config.batch_size > kept_train:
        raise ConfigError(f"{where}: batch_size={config.batch_size} is larger than the {kept_train} training rows, so "
                          f"every step would train on {kept_train}, not {config.batch_size}; use --set "
                          f"batch_size={kept_train} or less, or more data")
    return notices


def check_blank_rows(task, dataset: str) -> list[str]:
    """A notice for rows left out because their fields are empty strings."""
    if not task.blank_rows_removed:
        return []
    return [f"--dataset {dataset}: {task.blank_rows_removed} row(s) with empty fields are left out"]


# ----- where a run writes ------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_name_lengths(names: list[str], directory: Path, option: str) -> None:
    """Each name, used as a directory under ``directory``, fits the file system's limits.

    Raises:
        ConfigError: a name longer than the file-name limit, or a path past the path limit.
    """
    base = _existing_ancestor(directory)
    name_max = _pathconf(base, "PC_NAME_MAX", 255)
    path_max = _pathconf(base, "PC_PATH_MAX", 4096)
    for name in names:
        if len(name.encode()) > name_max:
            raise ConfigError(f"case id {name[:40]}... ({len(name.encode())} bytes) becomes a directory under "
                              f"{directory} for {option}, and file names here are limited to {name_max} bytes; "
                              "use shorter configuration ids or model and data set names")
        full = len(str((directory / name).absolute()).encode())
        if full > path_max:
            raise ConfigError(f"case id {name[:40]}... makes a path of {full} bytes under {directory} for {option}; "
                              f"paths here are limited to {path_max} bytes")


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError, AttributeError):
        return default


def check_writable(directory: Path, option: str) -> None:
    """Create ``directory`` if needed, then create and remove a probe file in it.

    Raises:
        StorageError: the directory cannot be made or written, with the reason in words.
    """
    from lorabench.storage.atomic import describe_os_error  # deferred: imports pytest_benchmark

    try:
        _probe_write(directory)
    except OSError as exc:
        raise StorageError(f"{option} {directory}: cannot write there ({describe_os_error(exc)}); the run's results "
                           "would be lost after training. Pick a writable directory") from None


def _probe_write(directory: Path) -> None:
    """Create ``directory`` if needed, then create and remove a file in it (raises ``OSError``)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".lorabench-probe-"):
        pass


def check_zoo_cache(to_build: list[str]) -> None:
    """The zoo models a run builds on first use can be kept in the model cache (``$LORABENCH_CACHE``).

    Args:
        to_build: the run's zoo models that are not built yet.

    Raises:
        StorageError: the cache directory cannot be made or written, naming the variable.
    """
    from lorabench.storage.atomic import describe_os_error  # deferred: imports pytest_benchmark

    if not to_build:
        return
    root = cache_root()
    try:
        _probe_write(root)
    except OSError as exc:
        named = f"LORABENCH_CACHE={root}" if "LORABENCH_CACHE" in os.environ else f"the model cache {root}"
        raise StorageError(f"{named}: cannot write there ({describe_os_error(exc)}); {', '.join(to_build)} is built "
                           "there on first use. Set LORABENCH_CACHE to a writable directory (default "
                           "~/.cache/lorabench)") from None


def output_bytes(cases: int) -> int:
    """Free bytes a run of ``cases`` cases needs for its outputs."""
    return OUTPUT_BYTES_FLOOR + cases * OUTPUT_BYTES_PER_CASE


def check_free_space(directory: Path, need: int, option: str) -> None:
    """At least ``need`` bytes free where ``directory`` lives.

    Raises:
        StorageError: fewer bytes are free, with both figures.
    """
    free = shutil.disk_usage(_existing_ancestor(directory)).free
    if free < need:
        raise StorageError(f"{option} {directory}: {free / 2**20:.1f} MiB free, and the run's outputs need up to "
                           f"{need / 2**20:.0f} MiB; free some space or pick another directory")


def check_output_dir(directory: Path, option: str, cases: int) -> None:
    """A directory the run will write: writable and with room for ``cases`` cases' outputs."""
    check_writable(directory, option)
    check_free_space(directory, output_bytes(cases), option)


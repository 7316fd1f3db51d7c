"""The embedded model zoo: tiny causal LMs built from a config, no download needed.

Each zoo model is built with a fixed seed, briefly pre-trained in fp32 on digit
copy, sort and reverse problems (so that fine-tuning adapts a model that already knows
something, as it does at full size), and saved as an ordinary Hugging Face
checkpoint directory with its tokenizer. The benchmark then loads it through the
same ``from_pretrained`` path as a hub model, quantization included.

The default model's checkpoint ships in the package (``lorabench/models/zoo_checkpoints/``,
written by ``scripts/build-zoo``, its files' SHA-256 in ``manifest.json``), so a first run
does not pre-train it; it is used while its recipe is the current one. Every other zoo model
is built on first use and cached on disk under ``$LORABENCH_CACHE`` (default
``~/.cache/lorabench``), keyed by everything that shapes it, and written atomically so an
interrupted build never leaves a half checkpoint behind. A damaged checkpoint (a truncated
weight or tokenizer file) is refused at load, naming the folder and how to restore it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import string
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from lorabench.models.checkpoints import safetensors_problem
from lorabench.config import TrainDefaults
from lorabench.errors import ModelError
from lorabench.data.tasks import collator, pretraining_examples, tokenize

# Deferred imports: datasets, tokenizers, torch, transformers inside the functions that use them: what only
# reads a configuration or a stored run starts without them.

log = logging.getLogger("lorabench.zoo")

SPECIAL_TOKENS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}
# Printable ASCII, so a tiny model can also read a user's English data set.
VOCAB_CHARS = string.printable[:95]
ZOO_RECIPE_VERSION = 1  # bump when the build or pre-training recipe changes

TINY_TRAIN_DEFAULTS = TrainDefaults(steps=60, batch_size=16, seq_len=32, lr_full=1e-3, lr_lora=3e-3)


@dataclass(frozen=True)
class PretrainRecipe:
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class ZooModel:
    """A tiny model: a transformers config class, its arguments, and how to pre-train it."""

    name: str
    family: str
    config_class: str
    config_kwargs: dict[str, Any]
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    defaults: TrainDefaults = TINY_TRAIN_DEFAULTS

    def cache_key(self) -> str:
        import torch
        import transformers

        blob = json.dumps(
            {
                "recipe": ZOO_RECIPE_VERSION,
                "spec": asdict(self),
                "vocab": VOCAB_CHARS,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def recipe_key(self) -> str:
        """What shapes the checkpoint apart from the libraries that build it: a shipped checkpoint
        is used while this matches the one it was built for."""
        blob = json.dumps({"recipe": ZOO_RECIPE_VERSION, "spec": asdict(self), "vocab": VOCAB_CHARS}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_HIDDEN, _LAYERS, _HEADS, _FFN = 256, 4, 4, 704
ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("tiny-llama", "llama", "LlamaConfig", dict(
            hidden_size=_HIDDEN, intermediate_size=_FFN, num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS, num_key_value_heads=_HEADS, max_position_embeddings=256,
            tie_word_embeddings=False)),
        ZooModel("tiny-qwen", "qwen3", "Qwen3Config", dict(
            hidden_size=_HIDDEN, intermediate_size=_FFN, num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS, num_key_value_heads=2, head_dim=_HIDDEN // _HEADS,
            max_position_embeddings=256, tie_word_embeddings=False)),
        ZooModel("tiny-gpt2", "gpt2", "GPT2Config", dict(
            n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, n_positions=256, tie_word_embeddings=False)),
        ZooModel("tiny-neox", "gpt_neox", "GPTNeoXConfig", dict(
            hidden_size=_HIDDEN, intermediate_size=_FFN, num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS, max_position_embeddings=256, tie_word_embeddings=False)),
    )
}


SHIPPED_DIR = Path(__file__).with_name("zoo_checkpoints")  # package data, written by scripts/build-zoo
SHIPPED_MANIFEST = SHIPPED_DIR / "manifest.json"
# The JSON files of a zoo checkpoint that a load reads, each checked whole before it is used
# (the first two must be there; the others are, as transformers of this version writes them).
_REQUIRED_JSON = ("config.json", "tokenizer.json")
_OPTIONAL_JSON = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


def cache_root() -> Path:
    return Path(os.environ.get("LORABENCH_CACHE", Path.home() / ".cache" / "lorabench"))


def shipped_manifest() -> dict[str, Any]:
    """The shipped checkpoints: name -> recipe_key, the SHA-256 of each file, and what built them."""
    return json.loads(SHIPPED_MANIFEST.read_text()) if SHIPPED_MANIFEST.is_file() else {}


def shipped_dir(name: str) -> Path | None:
    """The checkpoint of ``name`` shipped in the package, if one is shipped for its current recipe."""
    entry = shipped_manifest().get(name)
    if entry is None or entry["recipe_key"] != ZOO[name].recipe_key():
        return None  # a recipe changed since scripts/build-zoo ran: build it as any other zoo model
    return SHIPPED_DIR / name


def file_digests(directory: Path) -> dict[str, str]:
    """The SHA-256 of every file of a checkpoint directory, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def build_tokenizer():
    """A character-level fast tokenizer over printable ASCII, built offline with ``tokenizers``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in VOCAB_CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def _target(name: str) -> Path:
    return cache_root() / "zoo" / f"{name}-{ZOO[name].cache_key()}"


def is_cached(name: str) -> bool:
    """Whether zoo model ``name`` is shipped or built already (:func:`checkpoint_dir` returns at once)."""
    return shipped_dir(name) is not None or (_target(name) / "config.json").is_file()


def checkpoint_dir(name: str) -> Path:
    """The checkpoint directory of zoo model ``name``: the shipped one, else the cached one, built and
    pre-trained on first use.

    Raises:
        KeyError: ``name`` is not in the zoo.
        ModelError: the shipped or cached checkpoint is damaged (a file truncated or missing).
    """
    spec = ZOO[name]
    shipped = shipped_dir(name)
    if shipped is not None:
        _check_whole(name, shipped, "the installed package is damaged: reinstall lorabench, or rewrite the "
                                    "checkpoint with scripts/build-zoo")
        return shipped
    target = _target(name)
    if (target / "config.json").is_file():
        _check_whole(name, target, f"delete {target} and the next run rebuilds it")
        return target
    return build_once(target, lambda staging: build(spec, staging), f"built {name}", log)


def build_once(target: Path, make: Callable[[Path], None], done: str, logger: logging.Logger) -> Path:
    """The checkpoint folder ``target``, written by ``make(staging)`` unless it is there already.

    One build at a time per folder: concurrent sessions wait on a file lock instead of repeating the
    work. ``make`` writes into a hidden staging folder beside ``target``, renamed into place when whole,
    so readers see no checkpoint or a whole one. ``done`` starts the log line ("built tiny-llama").
    """
    from filelock import FileLock  # deferred as before: not needed when a shipped checkpoint serves

    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            started = time.perf_counter()
            make(staging)
            logger.info("%s in %.1f s (cached at %s)", done, time.perf_counter() - started, target)
            staging.rename(target)  # atomic
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_whole(name: str, directory: Path, remedy: str) -> None:
    """Refuse a checkpoint with a truncated or missing file (an interrupted copy, a full disk) before
    from_pretrained reads it and fails in its own words."""
    why = _damage(directory)
    if why:
        raise ModelError(f"zoo model {name}: the checkpoint {directory} is damaged ({why}); {remedy}")


def _damage(directory: Path) -> str | None:
    """The first file of a checkpoint directory that is missing or not whole; ``None`` when all are."""
    weights = directory / "model.safetensors"
    if not weights.is_file():
        return "model.safetensors is missing"
    problem = safetensors_problem(weights)
    if problem:
        return f"model.safetensors: {problem}"
    for file in (*_REQUIRED_JSON, *_OPTIONAL_JSON):
        path = directory / file
        if not path.is_file():
            if file in _REQUIRED_JSON:
                return f"{file} is missing"
            continue
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return f"{file} is not whole JSON (truncated?): {exc}"
    return None


def model_config(spec: ZooModel, tokenizer=None):
    """The transformers config of a zoo model (what its checkpoint's config.json holds), without building it."""
    import transformers

    tokenizer = tokenizer or build_tokenizer()
    config_cls = getattr(transformers, spec.config_class)
    return config_cls(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **spec.config_kwargs,
    )


def build(spec: ZooModel, out: Path) -> None:
    """Build, pre-train and save zoo model ``spec`` into the empty directory ``out``."""
    import torch
    import transformers

    tokenizer = build_tokenizer()
    config = model_config(spec, tokenizer)
    torch.manual_seed(spec.pretrain.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _pretrain(model, tokenizer, spec.pretrain)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "lorabench_zoo.json").write_text(json.dumps({"name": spec.name, **asdict(spec.pretrain)}, indent=2))


def _pretrain(model, tokenizer, recipe: PretrainRecipe) -> None:
    """Plain fp32 training on copy/sort/reverse problems: model preparation, not part of any measurement."""
    import torch


    import datasets

    rng = random.Random(recipe.seed)
    rows = pretraining_examples(rng, recipe.steps * recipe.batch_size)
    ds = tokenize(datasets.Dataset.from_list(rows), tokenizer, seq_len=64)
    collate = collator(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    model.train()
    for step in range(recipe.steps):
        batch = collate([ds[i] for i in range(step * recipe.batch_size, (step + 1) * recipe.batch_size)])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            log.info("pre-training %s: step %d/%d loss %.3f", model.config.model_type, step + 1, recipe.steps, loss.item())
    model.eval()

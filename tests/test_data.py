"""Data: the embedded task, user files, held-out splits, tokenization."""

from __future__ import annotations

import json

import pytest

from lorabench.data import load_task_data, tokenize
from lorabench.errors import DatasetError
from lorabench.zoo import build_tokenizer


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


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.jsonl", None, "missing.jsonl: file not found"),
        ("empty.jsonl", "", "needs at least 2 non-empty rows|could not be read"),
        ("cols.jsonl", '{"foo": 1}\n{"foo": 2}', r"columns \['foo'\] lack the needed ones; provide prompt\+completion"),
        ("blank.jsonl", '{"text": " "}\n{"text": ""}', "needs at least 2 non-empty rows .*has 0"),
        ("data.parquet", "x", "unsupported file type '.parquet'"),
    ],
)
def test_bad_datasets_name_the_file_and_the_problem(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_task_data(str(path))


def test_hub_name_not_in_cache_says_so():
    with pytest.raises(DatasetError, match="not loadable from the local Hugging Face cache"):
        load_task_data("no-such-org/no-such-dataset")

"""The synthetic task: deterministic, exactly checkable, and with the skewed length profile the length
benchmark needs (answer tokens under the bundled tokenizer = item count, median far below the maximum)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from dlm.cli import main
from dlm.data_streams import load_tokenizer
from dlm.errors import DataError
from dlm.evaluation.synthetic import TASKS, check, is_synthetic, iter_examples, solve, write_jsonl


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", 200, seed=3)
    b = write_jsonl(tmp_path / "b.jsonl", 200, seed=3)
    c = write_jsonl(tmp_path / "c.jsonl", 200, seed=4)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a == b and a != c
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rows == [e.row() for e in a] and set(rows[0]) == {"question", "answer"}


def test_checker_accepts_every_reference_answer_and_whitespace_variants() -> None:
    examples = list(iter_examples(400, seed=0))
    assert {e.task for e in examples} == set(TASKS)
    for e in examples:
        assert is_synthetic(e.question)
        assert solve(e.question) == e.answer
        assert check(e.question, e.answer)
        assert check(e.question, "  " + e.answer.replace(" ", " \n ") + "\n")


@pytest.mark.parametrize(
    ("question", "wrong"),
    [
        ("Repeat the word cat 4 times.", "cat cat cat"),  # one short
        ("Repeat the word cat 4 times.", "cat cat cat cat cat"),  # one too many
        ("Repeat the word cat 4 times.", "cat cat dog cat"),
        ("Count from 7 to 11.", "7 8 9 10"),
        ("Count from 7 to 11.", "7 8 9 10 11 12"),
        ("Count from 7 to 11.", "7 8 10 9 11"),
        ("Reverse these 4 digits: 1 2 3 4", "4 3 1 2"),
        ("Reverse these 4 digits: 1 2 3 4", "1 2 3 4"),
        ("Sort these 4 digits: 3 1 2 1", "1 2 3"),
        ("Sort these 4 digits: 3 1 2 1", "1 1 2 3 3"),
        ("Sort these 4 digits: 3 1 2 1", "112 3"),
    ],
)
def test_checker_rejects_near_misses(question: str, wrong: str) -> None:
    assert not check(question, wrong)


def test_checker_refuses_foreign_questions() -> None:
    assert not is_synthetic("What is 2 + 2?")
    with pytest.raises(DataError, match="not a synthetic-task question"):
        check("What is 2 + 2?", "4")
    with pytest.raises(DataError, match="says 3 digits but lists 2"):
        solve("Sort these 3 digits: 1 2")


def test_answer_tokens_equal_items_and_lengths_are_skewed_short() -> None:
    tok = load_tokenizer("gpt2-mdm").tokenizer
    examples = list(iter_examples(2000, seed=1))
    lengths = [len(tok.encode(e.answer)) for e in examples]
    assert lengths == [e.items for e in examples]
    assert min(lengths) == 2 and 200 <= max(lengths) <= 250
    median = statistics.median(lengths)
    assert 10 <= median <= 40  # log-uniform on [2, 250]: median about sqrt(2 * 250) = 22
    assert sum(n > 128 for n in lengths) >= 0.05 * len(lengths)  # a real right tail, not a few outliers


def test_max_answer_tokens_and_task_subset_are_respected() -> None:
    examples = list(iter_examples(300, seed=2, max_answer_tokens=40, tasks=["repeat", "count"]))
    assert max(e.items for e in examples) <= 40 and {e.task for e in examples} == {"repeat", "count"}
    with pytest.raises(DataError, match="max_answer_tokens"):
        list(iter_examples(1, max_answer_tokens=1))
    with pytest.raises(DataError, match="tasks must be"):
        list(iter_examples(1, tasks=["poem"]))


def test_cli_data_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "task.jsonl"
    assert main(["data", "synthetic", str(out), "--n", "50", "--seed", "5", "--max-answer-tokens", "64"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 50
    rows = [json.loads(line) for line in lines]
    assert all(check(r["question"], r["answer"]) for r in rows)
    assert "50 examples" in capsys.readouterr().out
    assert main(["data", "synthetic", str(tmp_path), "--n", "5"]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_test_set_can_exclude_the_training_questions(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", 3000, seed=1, max_answer_tokens=120)
    plain = list(iter_examples(300, seed=2, max_answer_tokens=120))
    train_questions = {e.question for e in train}
    assert any(e.question in train_questions for e in plain)  # without --exclude, short questions repeat
    test = write_jsonl(tmp_path / "test.jsonl", 300, seed=2, max_answer_tokens=120, exclude=[tmp_path / "train.jsonl"])
    assert len(test) == 300 and len({e.question for e in test}) == 300
    assert not {e.question for e in test} & train_questions
    assert test == write_jsonl(tmp_path / "again.jsonl", 300, seed=2, max_answer_tokens=120,
                               exclude=[tmp_path / "train.jsonl"])
    # "Repeat the word X 2 times." has only 8 forms: 50 new ones cannot exist
    with pytest.raises(DataError, match="of 50 new questions"):
        write_jsonl(tmp_path / "tiny.jsonl", 50, max_answer_tokens=2, tasks=["repeat"], exclude=[tmp_path / "test.jsonl"])
    with pytest.raises(DataError, match="does not exist"):
        write_jsonl(tmp_path / "x.jsonl", 5, exclude=[tmp_path / "missing.jsonl"])


def test_cli_data_synthetic_exclude(tmp_path: Path) -> None:
    assert main(["data", "synthetic", str(tmp_path / "train.jsonl"), "--n", "500", "--max-answer-tokens", "30"]) == 0
    assert main(["data", "synthetic", str(tmp_path / "test.jsonl"), "--n", "40", "--seed", "9",
                 "--max-answer-tokens", "30", "--exclude", str(tmp_path / "train.jsonl")]) == 0
    train = {json.loads(line)["question"] for line in (tmp_path / "train.jsonl").read_text().splitlines()}
    test = [json.loads(line)["question"] for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(test) == 40 and not set(test) & train

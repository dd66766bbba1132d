"""The word-level tokenizer for closed-vocabulary tasks: trained with `tokenizers`, loaded like any local
tokenizer, one token per answer item, decoding back to the exact answer text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlm.cli import main
from dlm.data_streams import load_tokenizer
from dlm.data_streams.word_tokenizer import iter_texts, train_word_tokenizer
from dlm.errors import DataError
from dlm.evaluation.synthetic import check, iter_examples


def test_synthetic_answers_are_one_token_per_item_and_decode_exactly(tmp_path: Path) -> None:
    examples = list(iter_examples(200, 0, 60, ["repeat", "count"]))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "answer": e.answer}) + "\n" for e in examples))
    size = train_word_tokenizer(iter_texts([data]), tmp_path / "tok")
    info = load_tokenizer(str(tmp_path / "tok"))
    assert info.vocab_size == size < 400
    assert (info.eos_id, info.pad_id, info.mask_id) == (1, 1, 2)
    for e in examples:
        ids = info.tokenizer.encode(e.answer)
        assert len(ids) == len(e.answer.split())
        decoded = info.tokenizer.decode(ids)
        assert decoded == e.answer and check(e.question, decoded)
    assert info.tokenizer.unk_token_id not in info.tokenizer.encode(examples[0].question)


def test_cli_writes_a_tokenizer_and_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "words.txt"
    text.write_text("one two three\nthree two one\n")
    assert main(["data", "word-tokenizer", str(text), "--out-dir", str(tmp_path / "tok")]) == 0
    assert "model.vocab_size=" in capsys.readouterr().out
    tok = load_tokenizer(str(tmp_path / "tok")).tokenizer
    ids = tok.encode("two one")
    assert len(ids) == 2 and tok.unk_token_id not in ids and tok.decode(ids) == "two one"
    assert tok.encode("four") == [tok.unk_token_id]
    with pytest.raises(DataError, match="no such file"):
        list(iter_texts([tmp_path / "missing.jsonl"]))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no words"):
        train_word_tokenizer(iter_texts([empty]), tmp_path / "tok2")

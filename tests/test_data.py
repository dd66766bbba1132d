"""File discovery, document streaming, packing, and the in-memory pretraining data on the bundled sample."""

from __future__ import annotations

import gzip
import json
import random
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dlm.data_streams import (
    PretrainData,
    detect_format,
    is_eval_document,
    iter_documents,
    load_pretrain_data,
    load_tokenizer,
    pack,
    resolve_files,
)
from dlm.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "fineweb-sample"
SAMPLE_GLOB = str(SAMPLE / "*.parquet")
C4 = Path("/work/shared/data/c4/c4_demo.jsonl")
SEQ_LEN = 256


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2-mdm")


@pytest.fixture(scope="module")
def sample(tokenizer) -> PretrainData:
    return load_pretrain_data([SAMPLE_GLOB], tokenizer, SEQ_LEN, show_progress=False)


@pytest.fixture
def c4_lines(tmp_path: Path) -> list[str]:
    """The first five C4 documents, as raw JSON lines (a copy of the shared file, or a stand-in without it)."""
    if C4.is_file():
        with C4.open(encoding="utf-8") as f:
            return [line.rstrip("\n") for line in islice(f, 5)]
    return [json.dumps({"text": f"Document number {i} of a small C4-like file.", "id": i}) for i in range(5)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- resolve_files / detect_format -------------------------------------------------------------------------


def test_resolve_files_globs_paths_and_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for name in ["a.jsonl", "b.txt", "sub/c.txt", "sub/deep/d.txt", "sub/deep/e.parquet", "sub/notes.md"]:
        (tmp_path / name).write_text("x\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_files(["**/*.txt"]) == [tmp_path / "b.txt", tmp_path / "sub/c.txt", tmp_path / "sub/deep/d.txt"]
    # Overlapping patterns, a plain relative path and a directory: sorted, deduplicated, absolute.
    got = resolve_files(["sub/deep/*", "a.jsonl", str(tmp_path / "sub" / "deep" / "d.txt"), "sub"])
    assert got == [tmp_path / name for name in ["a.jsonl", "sub/c.txt", "sub/deep/d.txt", "sub/deep/e.parquet"]]


def test_resolve_files_no_match_names_pattern_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(DataError, match=rf"'data/\*\.parquet' matches no file \(cwd {tmp_path}\)"):
        resolve_files(["a.txt", "data/*.parquet"])
    with pytest.raises(DataError, match="'missing.jsonl' matches no file"):
        resolve_files(["missing.jsonl"])
    with pytest.raises(DataError, match="no data paths given"):
        resolve_files([])


def test_detect_format() -> None:
    cases = {"a.parquet": "parquet", "a.json": "json", "a.JSONL": "json", "a.json.gz": "json",
             "a.jsonl.gz": "json", "wiki.txt": "text"}
    for name, fmt in cases.items():
        assert detect_format(Path(name)) == fmt
    with pytest.raises(DataError, match=r"unsupported extension; use files ending in \.parquet, \.json, .*\.txt"):
        detect_format(Path("table.csv"))


# --- iter_documents ------------------------------------------------------------------------------------------


def test_iter_documents_parquet_sample() -> None:
    files = resolve_files([SAMPLE_GLOB])
    docs = list(iter_documents(files))
    expected = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    assert len(docs) == 400
    assert docs == expected


def test_iter_documents_jsonl_and_gzip(tmp_path: Path, c4_lines: list[str]) -> None:
    plain = tmp_path / "c4.jsonl"
    plain.write_text("\n".join(c4_lines) + "\n", encoding="utf-8")
    packed = tmp_path / "c4_copy.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    expected = [json.loads(line)["text"] for line in c4_lines]
    assert list(iter_documents([plain])) == expected
    assert list(iter_documents([plain, packed])) == expected + expected


def test_iter_documents_text_lines_skip_blank(tmp_path: Path) -> None:
    path = tmp_path / "wiki.txt"
    path.write_text("First article.\n\n   \nSecond article, with a comma.\n\t\nThird.\n", encoding="utf-8")
    assert list(iter_documents([path], text_column="ignored for txt")) == [
        "First article.", "Second article, with a comma.", "Third."
    ]


def test_whitespace_only_and_null_docs_are_skipped(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "keep me"}, {"text": ""}, {"text": " \n\t "},
                                                {"text": None}, {"text": "and me"}])
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert list(iter_documents([empty, path, empty])) == ["keep me", "and me"]
    with pytest.raises(DataError, match="cannot read .*missing.jsonl"):
        list(iter_documents([tmp_path / "missing.jsonl"]))


def test_mixed_formats_stream_format_by_format(tmp_path: Path) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    b = tmp_path / "b.txt"
    b.write_text("b1\nb2\n")
    c = _write_jsonl(tmp_path / "c.jsonl", [{"text": "c1"}])
    assert list(iter_documents([a, b, c])) == ["a1", "a2", "c1", "b1", "b2"]


def test_missing_column_names_present_columns(tmp_path: Path, c4_lines: list[str]) -> None:
    path = tmp_path / "c4.jsonl"
    path.write_text("\n".join(c4_lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path} has no column 'content' \(columns: text.*\); set data.text_column"):
        list(iter_documents([path], text_column="content"))
    sample_file = resolve_files([SAMPLE_GLOB])[0]
    with pytest.raises(DataError, match=r"no column 'body' \(columns: id, score, reasoning, text, url, "):
        list(iter_documents([sample_file], text_column="body"))


def test_missing_column_in_one_of_several_files_names_it(tmp_path: Path) -> None:
    good = _write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    bad = _write_jsonl(tmp_path / "b.jsonl", [{"content": "wrong key"}])
    with pytest.raises(DataError, match=rf"{bad} has no column 'text' \(columns: content\)"):
        list(iter_documents([good, bad]))


def test_non_text_column_is_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "n.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(DataError, match="column 'text' holds int values, not text"):
        list(iter_documents([path]))


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"this is not a parquet file at all" * 10)
    with pytest.raises(DataError, match=rf"cannot read {bad} as parquet \(Arrow.*replace or remove the file"):
        list(iter_documents([bad]))
    good = resolve_files([SAMPLE_GLOB])[0]
    with pytest.raises(DataError, match=rf"cannot read {bad} as parquet"):
        list(iter_documents([good, bad]))


def test_corrupt_jsonl_names_the_file(tmp_path: Path) -> None:
    good = _write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=rf"cannot read {bad} as json"):
        list(iter_documents([good, bad]))


# --- pack ----------------------------------------------------------------------------------------------------


def test_pack_exact_rows_with_eos_and_doc_ids() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    # stream: 1 2 3 E | 4 5 E 6 | 7 8 9 10 | 11 12 E 13 | E (partial, dropped)
    rows = list(pack(docs, seq_len=4, eos_id=0))
    assert rows == [
        ([1, 2, 3, 0], [0, 0, 0, 0]),
        ([4, 5, 0, 6], [0, 0, 0, 1]),
        ([7, 8, 9, 10], [0, 0, 0, 0]),
        ([11, 12, 0, 13], [0, 0, 0, 1]),
    ]


def test_pack_doc_ending_at_row_boundary_and_long_doc() -> None:
    # stream: 1 2 E | 3 3 3 | 3 3 3 | 3 3 3 | 3 3 E | 4 E 5 | 6 E (partial, dropped)
    rows = list(pack([[1, 2], [3] * 11, [4], [5, 6]], seq_len=3, eos_id=9))
    assert rows == [
        ([1, 2, 9], [0, 0, 0]),
        ([3, 3, 3], [0, 0, 0]),
        ([3, 3, 3], [0, 0, 0]),
        ([3, 3, 3], [0, 0, 0]),
        ([3, 3, 9], [0, 0, 0]),
        ([4, 9, 5], [0, 0, 1]),
    ]


def test_pack_matches_stream_for_random_docs() -> None:
    rng = random.Random(0)
    docs = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 40))] for _ in range(60)]
    eos, seq_len = 0, 16
    stream = [t for d in docs for t in [*d, eos]]
    rows = list(pack(docs, seq_len, eos))
    assert len(rows) == len(stream) // seq_len
    assert [t for ids, _ in rows for t in ids] == stream[: len(rows) * seq_len]
    for ids, doc_ids in rows:
        assert len(ids) == len(doc_ids) == seq_len and doc_ids[0] == 0
        for i in range(1, seq_len):
            assert doc_ids[i] == doc_ids[i - 1] + (ids[i - 1] == eos)


def test_pack_rejects_bad_seq_len() -> None:
    with pytest.raises(ValueError, match="seq_len must be at least 1"):
        list(pack([[1]], seq_len=0, eos_id=0))


# --- load_pretrain_data --------------------------------------------------------------------------------------


def _complete_docs(rows: torch.Tensor, eos: int) -> list[tuple[int, ...]]:
    """Documents of a split's packed stream, cut at EOS; the last one may be cut short, so it is left out."""
    flat = rows.reshape(-1).tolist()
    docs, current = [], []
    for token in flat:
        current.append(token)
        if token == eos:
            docs.append(tuple(current[:-1]))
            current = []
    return docs


def test_sample_shapes_and_doc_ids(sample: PretrainData, tokenizer) -> None:
    assert sample.num_train_docs + sample.num_eval_docs == 400
    assert 5 <= sample.num_eval_docs <= 50
    for rows, doc_ids in [(sample.train_rows, sample.train_doc_ids), (sample.eval_rows, sample.eval_doc_ids)]:
        assert rows.dtype == doc_ids.dtype == torch.int64
        assert rows.shape == doc_ids.shape and rows.shape[1] == SEQ_LEN == sample.seq_len
        assert torch.all(doc_ids[:, 0] == 0)
        steps = doc_ids[:, 1:] - doc_ids[:, :-1]
        assert torch.equal(steps, (rows[:, :-1] == tokenizer.eos_id).long())
    total = (sample.train_rows.numel() + sample.eval_rows.numel())
    assert 600_000 < total <= 661_051


def test_sample_split_is_by_document(sample: PretrainData, tokenizer) -> None:
    decode = tokenizer.tokenizer.decode
    train = _complete_docs(sample.train_rows, tokenizer.eos_id)
    held_out = _complete_docs(sample.eval_rows, tokenizer.eos_id)
    assert len(train) >= sample.num_train_docs - 1 and len(held_out) >= sample.num_eval_docs - 1
    assert not set(train) & set(held_out)
    assert not any(is_eval_document(decode(d), 0.05) for d in train)
    assert all(is_eval_document(decode(d), 0.05) for d in held_out)


def test_sample_is_deterministic(sample: PretrainData, tokenizer) -> None:
    again = load_pretrain_data([SAMPLE_GLOB, str(SAMPLE / "batch_000001.parquet")], tokenizer, SEQ_LEN,
                               show_progress=False)
    for field in ["train_rows", "train_doc_ids", "eval_rows", "eval_doc_ids", "unigram_counts"]:
        assert torch.equal(getattr(again, field), getattr(sample, field)), field
    assert (again.num_train_docs, again.num_eval_docs) == (sample.num_train_docs, sample.num_eval_docs)


def test_unigram_cross_entropy_matches_numpy(sample: PretrainData, tokenizer) -> None:
    vocab = tokenizer.vocab_size
    counts = np.bincount(sample.train_rows.numpy().ravel(), minlength=vocab)
    assert sample.unigram_counts.shape == (vocab,) and sample.unigram_counts.dtype == torch.int64
    assert np.array_equal(sample.unigram_counts.numpy(), counts)
    probs = (counts + 1.0) / (counts.sum() + vocab)
    expected = float(-np.log(probs[sample.eval_rows.numpy().ravel()]).mean())
    got = sample.unigram_cross_entropy()
    assert 4.0 < got < 9.0
    assert got == pytest.approx(expected, rel=1e-12)


def test_split_ignores_file_order_and_keeps_duplicates_together(tmp_path: Path, tokenizer) -> None:
    texts = [f"Document {i}: " + " ".join(f"word{i * 7 + j}" for j in range(30)) for i in range(60)]
    _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:30]])
    _write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[30:]])
    _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in reversed(texts)])
    forward = load_pretrain_data([str(tmp_path / "[ab].jsonl")], tokenizer, 16, eval_fraction=0.3,
                                 show_progress=False)
    both = load_pretrain_data([str(tmp_path / "*.jsonl")], tokenizer, 16, eval_fraction=0.3, show_progress=False)
    assert (both.num_train_docs, both.num_eval_docs) == (2 * forward.num_train_docs, 2 * forward.num_eval_docs)
    decode = tokenizer.tokenizer.decode
    forward_eval = {decode(d) for d in _complete_docs(forward.eval_rows, tokenizer.eos_id)}
    both_eval = {decode(d) for d in _complete_docs(both.eval_rows, tokenizer.eos_id)}
    assert forward_eval <= set(texts) and forward_eval <= both_eval
    assert not both_eval & {decode(d) for d in _complete_docs(both.train_rows, tokenizer.eos_id)}


def test_max_docs_limits_documents(tokenizer) -> None:
    data = load_pretrain_data([SAMPLE_GLOB], tokenizer, 128, max_docs=40, eval_fraction=0.2, show_progress=False)
    assert data.num_train_docs + data.num_eval_docs == 40


def test_empty_splits_are_errors(tmp_path: Path, tokenizer) -> None:
    path = _write_jsonl(tmp_path / "small.jsonl", [{"text": f"short doc {i}"} for i in range(3)])
    with pytest.raises(DataError, match=r"the train split holds \d+ tokens from \d+ documents, less than one row of "
                                        r"data.seq_len=512; lower data.seq_len"):
        load_pretrain_data([str(path)], tokenizer, 512, eval_fraction=1e-9, show_progress=False)
    with pytest.raises(DataError, match=r"the eval split holds 0 tokens from 0 documents.*data.eval_fraction"):
        load_pretrain_data([SAMPLE_GLOB], tokenizer, 64, eval_fraction=1e-9, max_docs=20, show_progress=False)


def test_bad_arguments_are_config_errors(tokenizer) -> None:
    for kwargs in [{"eval_fraction": 0.0}, {"eval_fraction": 1.0}, {"max_docs": 0}, {"seq_len": 0}]:
        args = {"seq_len": 64, **kwargs}
        with pytest.raises(ConfigError):
            load_pretrain_data([SAMPLE_GLOB], tokenizer, show_progress=False, **args)


# --- batches -------------------------------------------------------------------------------------------------


def _toy(num_rows: int = 10, seq_len: int = 3) -> PretrainData:
    rows = torch.arange(num_rows * seq_len, dtype=torch.int64).reshape(num_rows, seq_len)
    return PretrainData(rows, torch.zeros_like(rows), rows[:7].clone(), torch.zeros_like(rows[:7]),
                        torch.zeros(64, dtype=torch.int64), num_rows, 7)


def test_train_batches_deterministic_and_epoch_shuffled() -> None:
    data = _toy()
    first = [b["input_ids"] for b in islice(data.train_batches(3, seed=7), 9)]
    again = [b["input_ids"] for b in islice(data.train_batches(3, seed=7), 9)]
    other = [b["input_ids"] for b in islice(data.train_batches(3, seed=8), 9)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    for epoch in range(3):  # 10 rows // 3 = 3 full batches per epoch, the 10th row is dropped
        seen = torch.cat(first[3 * epoch : 3 * epoch + 3])[:, 0]
        assert seen.unique().numel() == 9
    assert not torch.equal(torch.cat(first[:3]), torch.cat(first[3:6])), "each epoch has its own order"
    assert all(b.shape == (3, 3) and b.dtype == torch.int64 for b in first)


def test_train_batches_start_step_equals_iterating(sample: PretrainData) -> None:
    per_epoch = sample.train_rows.shape[0] // 64
    straight = list(islice(sample.train_batches(64, seed=3), per_epoch + 6))
    for start in [1, per_epoch - 1, per_epoch, per_epoch + 3]:
        resumed = list(islice(sample.train_batches(64, seed=3, start_step=start), 3))
        for offset, batch in enumerate(resumed):  # the resumed stream also continues across an epoch boundary
            assert torch.equal(batch["input_ids"], straight[start + offset]["input_ids"])
            assert torch.equal(batch["doc_ids"], straight[start + offset]["doc_ids"])
    assert straight[0]["input_ids"].shape == (64, SEQ_LEN)


def test_train_batches_bad_arguments() -> None:
    with pytest.raises(DataError, match="micro-batch of 11 rows is larger than the 10 packed train rows"):
        next(_toy().train_batches(11, seed=0))
    with pytest.raises(ValueError):
        next(_toy().train_batches(0, seed=0))
    with pytest.raises(ValueError):
        next(_toy().train_batches(2, seed=0, start_step=-1))


def test_eval_batches_cover_every_row_once() -> None:
    data = _toy()
    batches = list(data.eval_batches(3))
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), data.eval_rows)
    assert torch.equal(torch.cat([b["doc_ids"] for b in batches]), data.eval_doc_ids)

"""Sources (files, globs, hub), document streaming, the held-out split, the eval set, and every bad input."""

from __future__ import annotations

import gzip
import json
import random
import time
from itertools import islice
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow.parquet as pq
import pytest

from dlm.config import DataSection
from dlm.data_streams import (
    HubDataset,
    build_pretrain_stream,
    detect_format,
    is_eval_document,
    iter_documents,
    load_tokenizer,
    pack,
    resolve_files,
)
from dlm.data_streams.sources import hub_pieces
from dlm.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "fineweb-sample"
SAMPLE_GLOB = str(SAMPLE / "*.parquet")
C4 = Path("/work/shared/data/c4/c4_demo.jsonl")
SEQ_LEN = 256


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2-mdm")


def _data(**fields: object) -> DataSection:
    """A data section for tests: the bundled sample unless ``paths`` says otherwise."""
    return DataSection.model_validate({"paths": [SAMPLE_GLOB], **fields})


@pytest.fixture(scope="module")
def sample(tokenizer):
    """The whole bundled sample at seq_len 256, every held-out row kept."""
    return build_pretrain_stream(_data(seq_len=SEQ_LEN, max_eval_rows=10_000), tokenizer, seed=0, micro_batch_size=8)


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


def test_mixed_formats_stream_in_file_order(tmp_path: Path) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    b = tmp_path / "b.txt"
    b.write_text("b1\nb2\n")
    c = _write_jsonl(tmp_path / "c.jsonl", [{"text": "c1"}])
    assert list(iter_documents([a, b, c])) == ["a1", "a2", "b1", "b2", "c1"]


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


# --- more bad input: truncated parquet, invalid UTF-8, the hub offline ------------------------------------------


def test_truncated_parquet_names_the_file(tmp_path: Path) -> None:
    real = resolve_files([SAMPLE_GLOB])[0].read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(real[: len(real) // 2])
    with pytest.raises(DataError, match=rf"cannot read {cut} as parquet \(ArrowInvalid: .*replace or remove the file"):
        list(iter_documents([cut]))


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.txt"])
def test_invalid_utf8_names_the_file(tmp_path: Path, name: str) -> None:
    good = _write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    bad = tmp_path / name
    line = b'{"text": "bad \xff\xfe bytes"}' if name.endswith("jsonl") else b"bad \xff\xfe bytes"
    bad.write_bytes(b'{"text": "ok"}\n' + line + b"\n" if name.endswith("jsonl") else b"ok\n" + line + b"\n")
    with pytest.raises(DataError, match=rf"cannot read {bad} as (json|text) \(UnicodeDecodeError: 'utf-8' codec"):
        list(iter_documents([good, bad]))


def test_hub_dataset_offline_fails_fast_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    started = time.perf_counter()
    hub = HubDataset("dlm-test/no-such-dataset", "sample-10BT")
    with pytest.raises(DataError, match=r"cannot open hub dataset dlm-test/no-such-dataset \(sample-10BT\) split train "
                                        r"\(.*\); check data.hub_name .*HF_HUB_OFFLINE or HF_DATASETS_OFFLINE"):
        hub_pieces(hub)
    assert time.perf_counter() - started < 30, "offline must fail at once, not wait on the network"


# --- the held-out split and the eval set --------------------------------------------------------------------


def _complete_docs(rows: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    """Documents of a split's packed stream, cut at EOS; the last one may be cut short, so it is left out."""
    docs, current = [], []
    for token in rows.reshape(-1).tolist():
        current.append(token)
        if token == eos:
            docs.append(tuple(current[:-1]))
            current = []
    return docs


def _split_docs(tokenizer, paths: list[str], fraction: float = 0.05) -> tuple[list[list[int]], list[list[int]]]:
    """(train, eval) token lists of the files in order, computed the plain way as a reference."""
    train, held_out = [], []
    for text in iter_documents(resolve_files(paths)):
        ids = tokenizer.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        (held_out if is_eval_document(text, fraction) else train).append(ids)
    return train, held_out


def test_sample_eval_rows_match_the_plain_split(sample, tokenizer) -> None:
    train, held_out = _split_docs(tokenizer, [SAMPLE_GLOB])
    assert (len(train), len(held_out)) == (376, 24)  # as data/fineweb-sample/README.md says
    rows = sample.eval_set.rows
    expected = [ids for ids, _ in pack(held_out, SEQ_LEN, tokenizer.eos_id)]
    assert rows["input_ids"].tolist() == expected and sample.num_eval_rows == 140
    assert rows["input_ids"].dtype == rows["doc_ids"].dtype == np.int64
    steps = rows["doc_ids"][:, 1:] - rows["doc_ids"][:, :-1]
    assert np.array_equal(steps, (rows["input_ids"][:, :-1] == tokenizer.eos_id).astype(np.int64))
    assert np.all(rows["doc_ids"][:, 0] == 0)
    batches = list(sample.eval_batches(64))
    assert [b["input_ids"].shape[0] for b in batches] == [64, 64, 12]


def test_unigram_cross_entropy_matches_numpy(sample, tokenizer) -> None:
    train, _ = _split_docs(tokenizer, [SAMPLE_GLOB])
    train_rows = np.array([ids for ids, _ in pack(train, SEQ_LEN, tokenizer.eos_id)])
    vocab = tokenizer.vocab_size
    counts = np.bincount(train_rows.ravel(), minlength=vocab)
    assert np.array_equal(sample.eval_set.unigram_counts, counts)
    probs = (counts + 1.0) / (counts.sum() + vocab)
    expected = float(-np.log(probs[sample.eval_set.rows["input_ids"].ravel()]).mean())
    got = sample.unigram_cross_entropy()
    assert 4.0 < got < 9.0
    assert got == pytest.approx(expected, rel=1e-12)
    first = float(-np.log(probs[sample.eval_set.rows["input_ids"][:10].ravel()]).mean())
    assert sample.unigram_cross_entropy(10) == pytest.approx(first, rel=1e-12)  # the rows an eval of 10 scores


def test_training_stream_never_shows_held_out_documents(tokenizer) -> None:
    train, held_out = _split_docs(tokenizer, [SAMPLE_GLOB])
    stream = build_pretrain_stream(_data(seq_len=1024, format="rows", overflow="cut", max_eval_rows=10_000),
                                   tokenizer, seed=3, micro_batch_size=47)
    seen = set()
    for _ in range(8):  # 8 x 47 = 376 rows: exactly one epoch of one-document rows
        batch = next(stream)
        for row, length in zip(batch["input_ids"].tolist(), batch["answer_length"].tolist()):
            seen.add(tuple(row[: min(length, 1024)]))
    assert seen == {tuple(d[:1024]) for d in train}
    assert not seen & {tuple(d[:1024]) for d in held_out}
    assert stream.counters()["docs"] == 376


def test_split_ignores_file_order_and_keeps_duplicates_together(tmp_path: Path, tokenizer) -> None:
    texts = [f"Document {i}: " + " ".join(f"word{i * 7 + j}" for j in range(30)) for i in range(60)]
    _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:30]])
    _write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[30:]])
    _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in reversed(texts)])
    fields = {"seq_len": 16, "eval_fraction": 0.3, "max_eval_rows": 10_000}
    forward = build_pretrain_stream(_data(paths=[str(tmp_path / "[ab].jsonl")], **fields), tokenizer, seed=0,
                                    micro_batch_size=2)
    both = build_pretrain_stream(_data(paths=[str(tmp_path / "*.jsonl")], **fields), tokenizer, seed=0,
                                 micro_batch_size=2)
    assert both.eval_set.num_docs == 2 * forward.eval_set.num_docs > 0
    decode = tokenizer.tokenizer.decode
    forward_eval = {decode(d) for d in _complete_docs(forward.eval_set.rows["input_ids"], tokenizer.eos_id)}
    both_eval = {decode(d) for d in _complete_docs(both.eval_set.rows["input_ids"], tokenizer.eos_id)}
    assert forward_eval and forward_eval <= set(texts) and forward_eval <= both_eval
    assert all(is_eval_document(t, 0.3) for t in both_eval)


def test_max_docs_limits_documents(tokenizer) -> None:
    stream = build_pretrain_stream(_data(seq_len=4096, format="rows", overflow="cut", max_docs=40,
                                         eval_fraction=0.2, max_eval_rows=100), tokenizer, seed=0,
                                   micro_batch_size=1)
    train_docs = 40 - stream.eval_set.num_docs
    first_epoch = {tuple(next(stream)["input_ids"][0, :64].tolist()) for _ in range(train_docs)}
    assert len(first_epoch) == train_docs
    assert tuple(next(stream)["input_ids"][0, :64].tolist()) in first_epoch, "the second epoch repeats the docs"


def test_empty_splits_are_errors(tmp_path: Path, tokenizer) -> None:
    path = _write_jsonl(tmp_path / "small.jsonl", [{"text": f"short doc {i}"} for i in range(3)])
    with pytest.raises(DataError, match=r"the train split holds \d+ tokens from \d+ documents, less than one row of "
                                        r"data.seq_len=512 in format pretrain-packed; lower data.seq_len"):
        build_pretrain_stream(_data(paths=[str(path)], seq_len=512, eval_fraction=1e-9), tokenizer, seed=0,
                              micro_batch_size=1)
    with pytest.raises(DataError, match=r"the eval split holds 0 tokens from 0 documents.*data.eval_fraction"):
        build_pretrain_stream(_data(seq_len=64, eval_fraction=1e-9, max_docs=20), tokenizer, seed=0,
                              micro_batch_size=1)


def test_blank_documents_are_skipped_and_counted(tmp_path: Path, tokenizer) -> None:
    rows = []
    for i in range(40):
        rows.append({"text": f"Document {i} has a few words of real text in it."})
        rows.append({"text": [" ", "", "\n\t", None][i % 4]})
    path = _write_jsonl(tmp_path / "blanks.jsonl", rows)
    stream = build_pretrain_stream(_data(paths=[str(path)], seq_len=64, format="rows", eval_fraction=0.2,
                                         shuffle_buffer=8), tokenizer, seed=0, micro_batch_size=1)
    train_docs = 40 - stream.eval_set.num_docs
    texts = set()
    for _ in range(train_docs):  # exactly one epoch: the last block was read to the end of the file
        batch = next(stream)
        length = int(batch["answer_length"][0])
        texts.add(tokenizer.tokenizer.decode(batch["input_ids"][0, :length]))
    assert all(t.startswith("Document ") for t in texts) and len(texts) == train_docs
    assert stream.counters() == {"docs": train_docs, "empty_docs": 40, "dropped_too_long": 0, "cut_too_long": 0}


def test_bad_config_values_are_config_errors() -> None:
    from dlm.config import validate

    for fields, key in [
        ({"eval_fraction": 0.0}, "data.eval_fraction"),
        ({"eval_fraction": 1.0}, "data.eval_fraction"),
        ({"max_docs": 0}, "data.max_docs"),
        ({"seq_len": 1}, "data.seq_len"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"format": "chunks"}, "data.format"),
    ]:
        with pytest.raises(ConfigError, match=key):
            validate({"data": fields})

"""Token shards: prepare → read gives the tokenizer's ids exactly, uint16/uint32, the index, damaged or foreign
shards, the same split as the text path, and `dlm data prepare` / `dlm data stats` / training from shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from dlm.cli import main
from dlm.config import DataSection
from dlm.data_streams import (
    ShardSet,
    build_pretrain_stream,
    iter_documents,
    load_tokenizer,
    prepare_shards,
    resolve_files,
    shard_stats,
    tokenizer_fingerprint,
)
from dlm.data_streams.shards import HEADER_BYTES
from dlm.data_streams.split import text_hash
from dlm.errors import DataError

from .conftest import ROOT, tiny_overrides

SAMPLE_GLOB = str(ROOT / "data" / "fineweb-sample" / "*.parquet")
SMOKE = str(ROOT / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2-mdm")


@pytest.fixture(scope="module")
def prepared(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "sample"
    prepare_shards(SAMPLE_GLOB, out, tokenizer, shard_tokens=200_000, show_progress=False)
    return out


def test_round_trip_gives_the_tokenizers_ids_exactly(prepared: Path, tokenizer) -> None:
    texts = list(iter_documents(resolve_files([SAMPLE_GLOB])))
    shards = ShardSet.open(prepared, tokenizer)
    assert shards.num_docs == len(texts) == 400
    for i, text in enumerate(texts):
        expected = tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert shards.doc(i).tolist() == expected
        assert shards.doc_hash(i) == text_hash(text)
    assert all(s.dtype == np.dtype("<u2") and s.tokens.dtype == np.dtype("<u2") for s in shards.shards())


def test_index_lists_tokenizer_shards_and_counts(prepared: Path, tokenizer) -> None:
    index = json.loads((prepared / "index.json").read_text())
    assert index["format"] == "dlm-token-shards" and index["version"] == 1 and index["dtype"] == "uint16"
    assert index["tokenizer"]["name"] == "gpt2-mdm"
    assert index["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert index["eos_id"] == 50256 and index["docs"] == 400 and index["tokens"] == 660_651
    assert len(index["shards"]) == 4 and sum(s["docs"] for s in index["shards"]) == 400
    assert sum(s["tokens"] for s in index["shards"]) == index["tokens"]
    assert all(s["tokens"] >= 200_000 for s in index["shards"][:-1]), "a shard closes once it holds shard_tokens"
    assert index["sources"] == [str(p) for p in resolve_files([SAMPLE_GLOB])]
    for entry in index["shards"]:
        head = (prepared / entry["file"]).read_bytes()[:HEADER_BYTES]
        assert head[:8] == b"DLMTOKS\0"
        assert int.from_bytes(head[12:16], "little") == 2
        assert int.from_bytes(head[16:24], "little") == entry["tokens"]


def test_workers_write_identical_shards(prepared: Path, tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "parallel"
    index = prepare_shards(SAMPLE_GLOB, out, tokenizer, shard_tokens=200_000, workers=2, show_progress=False)
    for entry in index["shards"]:
        assert (out / entry["file"]).read_bytes() == (prepared / entry["file"]).read_bytes()


def test_large_vocabularies_use_uint32(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(70_000)]
    vocab = {"<eos>": 0, "<mask>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", mask_token="<mask>").save_pretrained(
        tmp_path / "big"
    )
    big = load_tokenizer(str(tmp_path / "big"))
    texts = ["w69990 w5 w69999", "w65536 w65535 w1", "w42"]
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n")
    index = prepare_shards(str(tmp_path / "d.txt"), tmp_path / "out", big, show_progress=False)
    assert index["dtype"] == "uint32"
    shards = ShardSet.open(tmp_path / "out", big)
    assert [shards.doc(i).tolist() for i in range(3)] == [[69993, 8, 70002], [65539, 65538, 4], [45]]


def test_shards_from_another_tokenizer_are_refused(prepared: Path, tmp_path: Path) -> None:
    backend = Tokenizer(WordLevel({"<eos>": 0, "<mask>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", mask_token="<mask>").save_pretrained(
        tmp_path / "other"
    )
    other = load_tokenizer(str(tmp_path / "other"))
    section = DataSection(source="shards", paths=[str(prepared)])
    with pytest.raises(DataError, match=rf"the token shards in {prepared} were written with tokenizer 'gpt2-mdm' "
                                        r"\(sha256 [0-9a-f]{12}\) but this run uses .*re-run `dlm data prepare"):
        build_pretrain_stream(section, other, seed=0, micro_batch_size=1)


def test_damaged_shards_name_the_file(prepared: Path, tokenizer, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in prepared.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / "shard_00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(DataError, match=rf"token shard {shard} is \d+ bytes but its header promises \d+ \(truncated"):
        ShardSet.open(copy, tokenizer)
    shard.write_bytes(b"NOTMAGIC" + data[8:])
    with pytest.raises(DataError, match=rf"{shard} is not a dlm token shard \(bad magic bytes\)"):
        ShardSet.open(copy, tokenizer)
    shard.unlink()
    with pytest.raises(DataError, match=rf"cannot read token shard {shard} \(No such file"):
        ShardSet.open(copy, tokenizer)
    (copy / "index.json").unlink()
    interrupted = r"holds no index.json \(shard files are there: the preparation was interrupted\)"
    with pytest.raises(DataError, match=interrupted):
        build_pretrain_stream(DataSection(source="shards", paths=[str(copy)]), tokenizer, seed=0, micro_batch_size=1)


def test_shards_train_on_the_same_split_as_the_text(prepared: Path, tokenizer) -> None:
    fields = {"seq_len": 128, "eval_fraction": 0.05, "max_eval_rows": 10_000}
    text = build_pretrain_stream(DataSection(paths=[SAMPLE_GLOB], **fields), tokenizer, seed=0, micro_batch_size=2)
    shards = build_pretrain_stream(DataSection(source="shards", paths=[str(prepared)], **fields), tokenizer, seed=0,
                                   micro_batch_size=2)
    for key in ("input_ids", "doc_ids"):
        assert np.array_equal(text.eval_set.rows[key], shards.eval_set.rows[key])
    assert np.array_equal(text.eval_set.unigram_counts, shards.eval_set.unigram_counts)
    assert text.unigram_cross_entropy() == shards.unigram_cross_entropy()
    batch = next(shards)
    assert batch["input_ids"].shape == (2, 128) and batch["input_ids"].dtype.is_floating_point is False


def test_cli_prepare_stats_and_train_from_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shards"
    assert main(["data", "prepare", SAMPLE_GLOB, str(out), "--shard-tokens", "300000", "--max-docs", "120"]) == 0
    captured = capsys.readouterr()
    assert "prepare: 100%" in captured.err and "120/120" in captured.err, "a progress bar with a known total (ETA)"
    assert f"documents in 1 uint16 shard(s) to {out}" in captured.out
    assert main(["data", "stats", str(out)]) == 0
    stats_text = capsys.readouterr().out
    assert "documents   120" in stats_text and "gpt2-mdm (sha256" in stats_text and "uint16" in stats_text
    assert main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats == shard_stats(out) and stats["docs"] == 120 and stats["doc_tokens"]["min"] >= 1

    assert main(["data", "prepare", SAMPLE_GLOB, str(out)]) == 2
    assert "already holds prepared shards" in capsys.readouterr().err

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, data__source="shards", data__max_docs=None)
    overrides = [o for o in overrides if not o.startswith("data.max_docs")] + [f"data.paths=[{out}]"]
    assert main(["train", SMOKE, *overrides]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_rows"] > 0 and summary["data"]["docs"] >= 1
    assert summary["eval_nelbo"] > 0 and summary["unigram_entropy"] > 0

"""Token shards on disk: the binary shard format, ``index.json``, and memory-mapped reading.

A directory written by ``dlm data prepare`` holds ``shard_00000.bin`` ... and an ``index.json`` that is written
last, so a directory without it is an interrupted preparation, never a silently partial corpus.

Shard layout (little-endian)::

    header   64 bytes  magic b"DLMTOKS\\0", u32 version, u32 bytes per token (2 = uint16, 4 = uint32),
                       u64 token count, u64 document count, zero padding
    tokens   count x (2 | 4) bytes   every document's ids back to back, no separators
    (zero padding to a multiple of 8 bytes)
    offsets  (docs + 1) x u64        document i is tokens[offsets[i]:offsets[i+1]]
    hashes   docs x u64              each document's split hash (:func:`dlm.data_streams.split.text_hash`)

Documents are stored without EOS so the same shards serve packed rows and one-document rows; explicit
offsets (not EOS positions) mark the boundaries, because a text can legitimately contain the EOS string.
uint16 holds ids below 65,536 (GPT-2); larger vocabularies (LLaDA's 126,464) are stored as uint32.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlm.data_streams.tokenizer import TokenizerInfo, tokenizer_fingerprint
from dlm.errors import DataError

MAGIC = b"DLMTOKS\0"
VERSION = 1
HEADER_BYTES = 64
INDEX_NAME = "index.json"
INDEX_FORMAT = "dlm-token-shards"
_HEADER = struct.Struct("<8sIIQQ")
_DTYPES: dict[int, np.dtype] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32."""
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.bin"


def _layout(num_tokens: int, num_docs: int, itemsize: int) -> tuple[int, int, int]:
    """Byte offsets of the offsets and hashes arrays, and the total file size."""
    offsets_at = HEADER_BYTES + num_tokens * itemsize
    offsets_at += -offsets_at % 8
    hashes_at = offsets_at + 8 * (num_docs + 1)
    return offsets_at, hashes_at, hashes_at + 8 * num_docs


def write_shard(path: Path, docs: Sequence[np.ndarray], hashes: Sequence[int], dtype: np.dtype) -> int:
    """Write one shard atomically (``.tmp`` then rename); returns its token count."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.uint64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype="<u8")
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    limit = np.iinfo(dtype).max
    if tokens.size and (int(tokens.max()) > limit or int(tokens.min()) < 0):
        raise DataError(f"token id {int(tokens.max())} does not fit {dtype.name} in {path}; this is a bug in dlm")
    num_tokens, itemsize = int(offsets[-1]), dtype.itemsize
    offsets_at, _, size = _layout(num_tokens, len(docs), itemsize)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(_HEADER.pack(MAGIC, VERSION, itemsize, num_tokens, len(docs)).ljust(HEADER_BYTES, b"\0"))
        fh.write(tokens.astype(dtype, copy=False).tobytes())
        fh.write(b"\0" * (offsets_at - HEADER_BYTES - num_tokens * itemsize))
        fh.write(offsets.tobytes())
        fh.write(np.asarray(hashes, dtype="<u8").tobytes())
        assert fh.tell() == size
    os.replace(tmp, path)
    return num_tokens


class TokenShard:
    """One shard file, memory-mapped: nothing is read until a document is asked for."""

    def __init__(self, path: Path, expect_docs: int | None = None, expect_tokens: int | None = None) -> None:
        self.path = path
        try:
            with path.open("rb") as fh:
                head = fh.read(HEADER_BYTES)
            size = path.stat().st_size
        except OSError as exc:
            raise DataError(
                f"cannot read token shard {path} ({exc.strerror}); re-run dlm data prepare for this directory"
            ) from exc
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise DataError(f"{path} is not a dlm token shard (bad magic bytes); re-run dlm data prepare")
        _, version, itemsize, num_tokens, num_docs = _HEADER.unpack(head[: _HEADER.size])
        if version != VERSION or itemsize not in _DTYPES:
            raise DataError(
                f"{path} is a token shard of format version {version} with {itemsize}-byte tokens; this dlm reads "
                f"version {VERSION} with 2- or 4-byte tokens; re-run dlm data prepare"
            )
        offsets_at, hashes_at, expected = _layout(num_tokens, num_docs, itemsize)
        if size != expected:
            raise DataError(
                f"token shard {path} is {size} bytes but its header promises {expected} (truncated or corrupt); "
                "re-run dlm data prepare"
            )
        if (expect_docs, expect_tokens) != (None, None) and (num_docs, num_tokens) != (expect_docs, expect_tokens):
            raise DataError(
                f"token shard {path} holds {num_docs} documents / {num_tokens} tokens but index.json lists "
                f"{expect_docs} / {expect_tokens}; the directory mixes two preparations, re-run dlm data prepare"
            )
        self.dtype = _DTYPES[itemsize]
        self.num_tokens, self.num_docs = num_tokens, num_docs
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
        self.offsets = np.memmap(path, dtype="<u8", mode="r", offset=offsets_at, shape=(num_docs + 1,))
        self.hashes = np.memmap(path, dtype="<u8", mode="r", offset=hashes_at, shape=(num_docs,))

    def doc(self, index: int) -> np.ndarray:
        """Token ids of document ``index`` (a read-only view into the mapped file)."""
        return self.tokens[int(self.offsets[index]) : int(self.offsets[index + 1])]


def read_index(directory: str | Path) -> dict[str, Any]:
    """Load and check ``index.json``; its absence or damage is a DataError with the fix."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    if not path.is_file():
        hint = " (shard files are there: the preparation was interrupted)" if any(directory.glob("shard_*")) else ""
        raise DataError(
            f"{directory} holds no {INDEX_NAME}{hint}; point data.paths at a directory written by "
            "`dlm data prepare SOURCE OUT_DIR`, or run it"
        )
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}); re-run dlm data prepare") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or index.get("version") != VERSION:
        raise DataError(
            f"{path} is not a version-{VERSION} {INDEX_FORMAT} index; re-run dlm data prepare with this dlm"
        )
    return index


@dataclass
class ShardSet:
    """Every document of a prepared directory, addressed by one global index in shard order.

    Shards are memory-mapped lazily in each process that reads them (data-loader workers included), so the
    object is cheap to pickle and its pages are shared through the OS cache.
    """

    directory: Path
    index: dict[str, Any]
    max_docs: int | None = None

    def __post_init__(self) -> None:
        docs = [int(s["docs"]) for s in self.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(docs, dtype=np.int64)])
        total = int(self.starts[-1])
        self.num_docs = total if self.max_docs is None else min(total, self.max_docs)
        self._shards: list[TokenShard] | None = None

    @classmethod
    def open(
        cls, directory: str | Path, tokenizer: TokenizerInfo | None = None, max_docs: int | None = None
    ) -> ShardSet:
        """Read the index, check every shard's header and size, and (given one) the tokenizer."""
        directory = Path(directory)
        shards = cls(directory, read_index(directory), max_docs)
        if tokenizer is not None:
            shards.check_tokenizer(tokenizer)
        shards.shards()
        return shards

    def check_tokenizer(self, tokenizer: TokenizerInfo) -> None:
        """Shards written by another tokenizer would feed ids that mean other words: refuse them."""
        written = self.index["tokenizer"]
        if written["fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise DataError(
                f"the token shards in {self.directory} were written with tokenizer {written['name']!r} "
                f"(sha256 {written['fingerprint'][:12]}) but this run uses {tokenizer.name!r} "
                f"(sha256 {tokenizer_fingerprint(tokenizer)[:12]}); set tokenizer.name_or_path to the shards' "
                f"tokenizer or re-run `dlm data prepare ... --tokenizer {tokenizer.name}`"
            )

    def shards(self) -> list[TokenShard]:
        if self._shards is None:
            self._shards = [
                TokenShard(self.directory / s["file"], int(s["docs"]), int(s["tokens"])) for s in self.index["shards"]
            ]
        return self._shards

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_shards"] = None
        return state

    def locate(self, doc: int) -> tuple[TokenShard, int]:
        """The shard holding global document ``doc`` and its index inside that shard."""
        shard = int(np.searchsorted(self.starts, doc, side="right")) - 1
        return self.shards()[shard], doc - int(self.starts[shard])

    def doc(self, doc: int) -> np.ndarray:
        shard, local = self.locate(doc)
        return shard.doc(local)

    def doc_hash(self, doc: int) -> int:
        shard, local = self.locate(doc)
        return int(shard.hashes[local])

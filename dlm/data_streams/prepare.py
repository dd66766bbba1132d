"""``dlm data prepare`` and ``dlm data stats``: tokenize a source once into token shards, and describe them.

Preparation reads the source in file order, tokenizes batches of documents in ``workers`` processes (results
are taken back in order, so the output is byte-identical for any worker count), and writes a shard whenever
``shard_tokens`` tokens are buffered; documents are never split across shards. ``index.json`` is written
last. A training run reading the shards sees exactly the documents (and the same held-out split) a run
tokenizing the same files on the fly would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dlm.data_streams.shards import (
    INDEX_FORMAT,
    INDEX_NAME,
    VERSION,
    ShardSet,
    read_index,
    shard_name,
    token_dtype,
    write_shard,
)
from dlm.data_streams.sources import (
    HubDataset,
    Piece,
    count_rows,
    file_pieces,
    hub_pieces,
    iter_piece_rows,
    limit_pieces,
    resolve_files,
    text_of_row,
)
from dlm.data_streams.split import text_hash
from dlm.data_streams.tokenizer import TokenizerInfo, encode_texts, tokenizer_fingerprint
from dlm.errors import DataError

HUB_PREFIX = "hf:"
DEFAULT_SHARD_TOKENS = 100_000_000
_CHUNK_ROWS = 256

_worker: dict[str, Any] = {}


def parse_source(source: str, hub_config: str | None = None, hub_split: str = "train",
                 hub_revision: str | None = None) -> tuple[list[Piece], list[Any]]:
    """``hf:OWNER/NAME`` is a hub dataset; anything else a local file, directory or glob. Returns the pieces
    and the description that ``index.json`` records as its sources."""
    if source.startswith(HUB_PREFIX):
        hub = HubDataset(source[len(HUB_PREFIX) :], hub_config, hub_split, hub_revision)
        return hub_pieces(hub), [{"hub": hub.name, "config": hub.config, "split": hub.split, "revision": hub.revision}]
    if hub_config is not None:
        raise DataError(f"--hub-config applies to hub sources ({HUB_PREFIX}OWNER/NAME), not to {source!r}")
    files = resolve_files([source])
    return file_pieces(files), [str(f) for f in files]


def _init_worker(tokenizer: TokenizerInfo, dtype: np.dtype) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker["tokenizer"], _worker["dtype"] = tokenizer, dtype


def _encode_chunk(texts: list[str]) -> tuple[list[np.ndarray], list[int]]:
    docs = encode_texts(_worker["tokenizer"], texts)
    return [d.astype(_worker["dtype"]) for d in docs], [text_hash(t) for t in texts]


def _chunks(pieces: list[Piece], text_column: str, counts: dict[str, int]) -> Iterator[tuple[list[str], int]]:
    """(non-blank texts, rows read) in batches, counting blank documents."""
    texts: list[str] = []
    rows = 0
    for piece in pieces:
        for row in iter_piece_rows(piece, [text_column]):
            rows += 1
            text = text_of_row(row, text_column, piece)
            if text is None:
                counts["empty_docs"] += 1
            else:
                texts.append(text)
            if rows == _CHUNK_ROWS:
                yield texts, rows
                texts, rows = [], 0
    if rows:
        yield texts, rows


def _encoded(chunks: Iterator[tuple[list[str], int]], workers: int, tokenizer: TokenizerInfo,
             dtype: np.dtype) -> Iterator[tuple[list[np.ndarray], list[int], int]]:
    """Encoded chunks in input order; with workers, at most 2 per worker in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(tokenizer, dtype)
        for texts, rows in chunks:
            yield (*_encode_chunk(texts), rows)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer, dtype)) as pool:
        pending: deque[tuple[Any, int]] = deque()
        for texts, rows in chunks:
            pending.append((pool.apply_async(_encode_chunk, (texts,)), rows))
            if len(pending) >= 2 * workers:
                result, n = pending.popleft()
                yield (*result.get(), n)
        while pending:
            result, n = pending.popleft()
            yield (*result.get(), n)


def prepare_shards(
    source: str,
    out_dir: str | Path,
    tokenizer: TokenizerInfo,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int = 1,
    text_column: str = "text",
    hub_config: str | None = None,
    hub_split: str = "train",
    max_docs: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``source`` into ``out_dir`` (see the module docstring); returns the index written."""
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    out = Path(out_dir)
    if (out / INDEX_NAME).exists():
        raise DataError(f"{out} already holds prepared shards ({INDEX_NAME}); choose another directory or delete it")
    pieces, sources = parse_source(source, hub_config, hub_split)
    if max_docs is not None:
        pieces = limit_pieces(pieces, max_docs, [text_column])
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("shard_*.bin"), *out.glob("shard_*.bin.tmp")]:
        stale.unlink()  # left by an interrupted preparation: no index ever pointed at them
    known = [count_rows(p) for p in pieces]
    total = sum(c for c in known if c is not None) if all(c is not None for c in known) else None
    dtype = token_dtype(tokenizer.vocab_size)
    counts = {"empty_docs": 0}
    shards: list[dict[str, Any]] = []
    docs: list[np.ndarray] = []
    hashes: list[int] = []
    buffered = 0
    started = time.perf_counter()

    def flush() -> None:
        nonlocal docs, hashes, buffered
        name = shard_name(len(shards))
        tokens = write_shard(out / name, docs, hashes, dtype)
        shards.append({"file": name, "docs": len(docs), "tokens": tokens})
        docs, hashes, buffered = [], [], 0

    with tqdm(total=total, desc="prepare", unit="doc", disable=not show_progress, dynamic_ncols=True) as bar:
        for encoded, doc_hashes, rows in _encoded(_chunks(pieces, text_column, counts), workers, tokenizer, dtype):
            for doc, key in zip(encoded, doc_hashes):
                docs.append(doc)
                hashes.append(key)
                buffered += len(doc)
                if buffered >= shard_tokens:
                    flush()
            bar.update(rows)
            written = sum(s["tokens"] for s in shards) + buffered
            bar.set_postfix(tokens=f"{written / 1e6:.1f}M", shards=len(shards))
    if docs:
        flush()
    if not shards:
        raise DataError(f"{source} holds no non-blank document; nothing to prepare")
    index = {
        "format": INDEX_FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "tokenizer": {
            "name": tokenizer.name,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "mask_id": tokenizer.mask_id,
        },
        "eos_id": tokenizer.eos_id,
        "text_column": text_column,
        "sources": sources,
        "max_docs": max_docs,
        "shard_tokens": shard_tokens,
        "docs": sum(s["docs"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "skipped": counts,
        "shards": shards,
        "seconds": round(time.perf_counter() - started, 3),
    }
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / INDEX_NAME)
    return index


def shard_stats(directory: str | Path) -> dict[str, Any]:
    """The index summary plus document-length statistics and bytes on disk (every shard is checked)."""
    shards = ShardSet.open(directory)
    lengths = np.concatenate([np.diff(np.asarray(s.offsets)) for s in shards.shards()])
    index = read_index(directory)
    return {
        "directory": str(Path(directory)),
        "dtype": index["dtype"],
        "tokenizer": index["tokenizer"],
        "eos_id": index["eos_id"],
        "shards": len(index["shards"]),
        "docs": index["docs"],
        "tokens": index["tokens"],
        "bytes": sum((Path(directory) / s["file"]).stat().st_size for s in index["shards"]),
        "doc_tokens": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
        },
        "skipped": index.get("skipped", {}),
        "sources": index["sources"],
        "per_shard": index["shards"],
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The human-readable form of :func:`shard_stats` that ``dlm data stats`` prints."""
    tok, lengths = stats["tokenizer"], stats["doc_tokens"]
    sources = stats["sources"]
    shown = ", ".join(str(s) for s in sources[:3]) + (f", ... ({len(sources)} in all)" if len(sources) > 3 else "")
    lines = [
        f"directory   {stats['directory']}",
        f"tokenizer   {tok['name']} (sha256 {tok['fingerprint'][:12]}, vocab {tok['vocab_size']}, "
        f"eos {stats['eos_id']})",
        f"dtype       {stats['dtype']}",
        f"shards      {stats['shards']} ({stats['bytes'] / 2**20:.1f} MiB)",
        f"documents   {stats['docs']:,}",
        f"tokens      {stats['tokens']:,}",
        f"doc tokens  min {lengths['min']:,}  median {lengths['median']:,.0f}  mean {lengths['mean']:,.1f}  "
        f"max {lengths['max']:,}",
        f"skipped     {', '.join(f'{k} {v}' for k, v in stats['skipped'].items()) or 'none'}",
        f"sources     {shown}",
    ]
    return "\n".join(lines)


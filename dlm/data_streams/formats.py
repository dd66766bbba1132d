"""Row formats: how a stream of tokenized documents becomes fixed-length rows, and the read head that makes
every format resumable to the token.

- ``pretrain-packed``: documents joined, each closed by EOS, cut every ``seq_len`` tokens. ``doc_ids`` number
  the documents inside each row from 0 (a document cut at a row boundary continues as doc 0 of the next row),
  so attention can stay inside a document and a row never depends on what came before it.
- ``rows``: one document per row, ``[text, EOS, pad ...]``. A document longer than ``seq_len - 1`` tokens is
  dropped or, with ``overflow="cut"``, cut to ``seq_len`` tokens without EOS; both are counted.
- ``sft``: ``[prompt, answer, EOS, pad ...]`` with ``prompt_mask`` True on the prompt. Too long: dropped, or the
  answer is cut (a prompt that leaves no room for an answer token is always dropped).

Rows and SFT batches carry ``answer_length``: the true number of tokens of the generated part (the whole
document in ``rows``, the answer in ``sft``), before EOS padding and before any cut, which is what the length
head learns to predict. All formats emit ``input_ids`` and ``doc_ids`` as int64 ``[B, T]``.

Packed rows are filled round-robin from ``lanes`` independent packers ("lanes", one per row of the first
micro-batch): each lane packs its own run of documents, taken in stream order as it needs them, so the rows of
one batch come from different documents instead of being consecutive slices of the same few, which would make
every batch's gradient about two or three texts.

The :class:`DocFeed` stands between a document stream and a format. Its state is the cursor of the next
document, each lane's document (by its cursor) and how many of its tokens were already emitted, the number of
rows made, and the counters. Because a format consumes documents only through it, every batch boundary is a
resumable point for every format and every ``seq_len``, which is what lets the sequence length change between
two steps without losing or repeating a token: each lane continues mid-document at its offset.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from dlm.data_streams.documents import Cursor, Doc
from dlm.data_streams.format_specs import FORMATS, data_format
from dlm.errors import DataError

__all__ = ["FORMATS", "DocFeed", "format_all", "make_batch", "pack"]


class DocStream(Protocol):
    def iterate(self, cursor: Cursor) -> Iterator[tuple[Doc, Cursor, int]]: ...


class DocFeed:
    """The read heads over one consumer's document stream (see the module docstring)."""

    def __init__(self, stream: DocStream, cursor: Cursor, lanes: int = 1, state: dict[str, Any] | None = None):
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self._stream = stream
        self.next_cursor: Cursor = dict(cursor)
        self.rows = 0
        self.counters: Counter[str] = Counter()
        self._lanes: list[tuple[Cursor, int] | None] = [None] * lanes  # (cursor of the lane's doc, offset)
        self._docs: list[Doc | None] = [None] * lanes
        self._iter: Iterator[tuple[Doc, Cursor, int]] | None = None
        if state is not None:
            self.next_cursor = dict(state["cursor"])
            self.rows = int(state["rows"])
            self.counters = Counter(state["counters"])
            self._lanes = [None if lane is None else (dict(lane[0]), int(lane[1])) for lane in state["lanes"]]
            self._docs = [None] * len(self._lanes)

    @property
    def num_lanes(self) -> int:
        return len(self._lanes)

    def current(self, lane: int = 0) -> Doc:
        """The document under lane ``lane`` (the next one of the stream when the lane has none)."""
        doc = self._docs[lane]
        if doc is not None:
            return doc
        held = self._lanes[lane]
        if held is not None:  # resumed mid-document: read it again where it lies in the stream
            doc = next(iter(self._stream.iterate(held[0])))[0]
        else:
            if self._iter is None:
                self._iter = self._stream.iterate(self.next_cursor)
            at = self.next_cursor
            doc, self.next_cursor, empty = next(self._iter)
            self.counters["empty_docs"] = empty
            self.counters["docs"] += 1
            self._lanes[lane] = (at, 0)
        self._docs[lane] = doc
        return doc

    def offset(self, lane: int = 0) -> int:
        """Tokens of the lane's document already emitted."""
        held = self._lanes[lane]
        return 0 if held is None else held[1]

    def advance(self, lane: int, tokens: int) -> None:
        held = self._lanes[lane]
        assert held is not None
        self._lanes[lane] = (held[0], held[1] + tokens)

    def finish(self, lane: int = 0) -> None:
        """The lane's document is done; the lane takes the stream's next document when asked."""
        self._lanes[lane], self._docs[lane] = None, None

    def take(self) -> Doc:
        """The next whole document (one-document-per-row formats)."""
        doc = self.current(0)
        self.finish(0)
        return doc

    @property
    def epoch(self) -> int:
        return int(self.next_cursor["epoch"])

    def state(self) -> dict[str, Any]:
        return {
            "cursor": dict(self.next_cursor),
            "rows": self.rows,
            "lanes": [None if lane is None else [dict(lane[0]), lane[1]] for lane in self._lanes],
            "counters": dict(self.counters),
        }


class _DropGuard:
    """Fails instead of looping forever when no document of a whole epoch fits a row."""

    def __init__(self, feed: DocFeed, seq_len: int, what: str) -> None:
        self.feed, self.seq_len, self.what = feed, seq_len, what
        self.since: int | None = None

    def dropped(self) -> None:
        self.feed.counters["dropped_too_long"] += 1
        if self.since is None:
            self.since = self.feed.epoch
        elif self.feed.epoch >= self.since + 2:
            raise DataError(
                f"no {self.what} in a whole epoch fits data.seq_len={self.seq_len} (all dropped as too long); "
                "raise data.seq_len or set data.overflow=cut"
            )

    def kept(self) -> None:
        self.since = None


def packed_batch(feed: DocFeed, rows: int, seq_len: int, eos_id: int, pad_id: int | None = None,
                 overflow: str = "drop") -> dict[str, np.ndarray]:
    """``rows`` packed rows: documents back to back, each followed by EOS; row ``j`` from lane ``j % lanes``.
    Packed rows are never padded and never overflow, so ``pad_id`` and ``overflow`` are unused."""
    ids = np.empty((rows, seq_len), dtype=np.int64)
    doc_ids = np.empty((rows, seq_len), dtype=np.int64)
    for r in range(rows):
        lane = feed.rows % feed.num_lanes
        pos, segment = 0, 0
        while pos < seq_len:
            tokens = feed.current(lane).tokens
            length = len(tokens) + 1
            start = feed.offset(lane)
            take = min(seq_len - pos, length - start)
            body = max(0, min(take, len(tokens) - start))
            ids[r, pos : pos + body] = tokens[start : start + body]
            if body < take:
                ids[r, pos + body] = eos_id
            doc_ids[r, pos : pos + take] = segment
            pos += take
            feed.advance(lane, take)
            if start + take == length:
                feed.finish(lane)
                segment += 1
        feed.rows += 1
    return {"input_ids": ids, "doc_ids": doc_ids}


def doc_rows_batch(feed: DocFeed, rows: int, seq_len: int, eos_id: int, pad_id: int,
                   overflow: str) -> dict[str, np.ndarray]:
    """``rows`` rows of one document each: ``[text, EOS, pad ...]``."""
    ids = np.full((rows, seq_len), pad_id, dtype=np.int64)
    lengths = np.empty(rows, dtype=np.int64)
    guard = _DropGuard(feed, seq_len, "document")
    for r in range(rows):
        while True:
            tokens = feed.take().tokens
            n = len(tokens)
            if n < seq_len:
                ids[r, :n] = tokens
                ids[r, n] = eos_id
            elif overflow == "drop":
                guard.dropped()
                continue
            else:
                ids[r] = tokens[:seq_len]
                feed.counters["cut_too_long"] += 1
            lengths[r] = n
            guard.kept()
            break
    return {"input_ids": ids, "doc_ids": np.zeros_like(ids), "answer_length": lengths}


def sft_batch(feed: DocFeed, rows: int, seq_len: int, eos_id: int, pad_id: int,
              overflow: str) -> dict[str, np.ndarray]:
    """``rows`` SFT rows ``[prompt, answer, EOS, pad ...]`` with the prompt mask and true answer lengths."""
    ids = np.full((rows, seq_len), pad_id, dtype=np.int64)
    prompt_mask = np.zeros((rows, seq_len), dtype=bool)
    lengths = np.empty(rows, dtype=np.int64)
    guard = _DropGuard(feed, seq_len, "example")
    for r in range(rows):
        while True:
            doc = feed.take()
            assert doc.prompt is not None
            p, a = len(doc.prompt), len(doc.tokens)
            if p + a < seq_len:
                ids[r, :p] = doc.prompt
                ids[r, p : p + a] = doc.tokens
                ids[r, p + a] = eos_id
            elif overflow == "drop" or p >= seq_len:
                guard.dropped()
                continue
            else:
                ids[r, :p] = doc.prompt
                ids[r, p:] = doc.tokens[: seq_len - p]
                feed.counters["cut_too_long"] += 1
            prompt_mask[r, :p] = True
            lengths[r] = a
            guard.kept()
            break
    return {"input_ids": ids, "doc_ids": np.zeros_like(ids), "prompt_mask": prompt_mask, "answer_length": lengths}


def make_batch(fmt: str, feed: DocFeed, rows: int, seq_len: int, eos_id: int, pad_id: int,
               overflow: str) -> dict[str, np.ndarray]:
    """One batch of ``rows`` x ``seq_len`` in format ``fmt`` (its builder from the registry)."""
    builder = globals()[data_format(fmt).builder]
    return builder(feed, rows, seq_len, eos_id, pad_id, overflow)  # type: ignore[no-any-return]


class ListStream:
    """A finite document stream over a list (one pass, no epochs): eval rows and tests."""

    def __init__(self, docs: list[Doc]) -> None:
        self.docs = docs

    def iterate(self, cursor: Cursor) -> Iterator[tuple[Doc, Cursor, int]]:
        for i in range(cursor["pos"], len(self.docs)):
            yield self.docs[i], {"epoch": 0, "pos": i + 1}, 0


def format_all(fmt: str, docs: list[Doc], seq_len: int, eos_id: int, pad_id: int,
               overflow: str = "drop") -> tuple[dict[str, np.ndarray], Counter[str]]:
    """Every full row the documents make, in order (a packed tail shorter than a row is dropped), and the
    counters (dropped or cut documents)."""
    feed = DocFeed(ListStream(docs), {"epoch": 0, "pos": 0})
    parts: list[dict[str, np.ndarray]] = []
    while True:
        try:
            parts.append(make_batch(fmt, feed, 1, seq_len, eos_id, pad_id, overflow))
        except StopIteration:
            break
    if not parts:
        return {}, feed.counters
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, feed.counters


def pack(token_docs: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``(input_ids, doc_ids)`` packed rows of exactly ``seq_len`` tokens; the final partial row is dropped.

    The list-based view of ``pretrain-packed`` (the same code path), for callers and tests that think in lists.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    docs = [Doc(tokens=np.asarray(d, dtype=np.int64)) for d in token_docs]
    rows, _ = format_all("pretrain-packed", docs, seq_len, eos_id, eos_id)
    for ids, doc_ids in zip(rows.get("input_ids", []), rows.get("doc_ids", [])):
        yield ids.tolist(), doc_ids.tolist()

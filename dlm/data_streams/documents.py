"""Resumable, sharded, shuffled streams of tokenized documents: one per consumer (a (rank, worker) pair).

Both streams are infinite: epoch ``e`` visits every training document of the source exactly once across the
consumers, in an order that is a pure function of ``(seed, e)``, then epoch ``e + 1`` begins. Each yields
``(doc, cursor_after, empty_docs)``: the cursor is a small dict of ints from which :meth:`iterate` restarts at
the next document exactly, which is all a checkpoint needs; nothing random or buffered is ever saved.

- :class:`TextDocStream` reads text (local files or a hub dataset) sequentially. Pieces (files, hub shards) are
  reordered per epoch and split over consumers by :func:`~dlm.data_streams.shuffle.plan_pieces`; documents
  are shuffled in blocks of ``shuffle_buffer``: a block is read, permuted by ``(seed, epoch, consumer,
  block)``, and tokenized lazily in small batches as it is consumed. A cursor names the block's first row and
  the position inside the permuted block, so a resume re-reads at most one block and never tokenizes a
  document it will not emit.
- :class:`ShardDocStream` reads prepared token shards by random access: position ``i`` of epoch ``e`` is
  document ``P_e(i)`` of a memory-free permutation of all documents, consumer ``c`` of ``C`` takes positions
  ``c, c + C, c + 2C, ...``; the cursor is (epoch, position).

Held-out documents (by split hash) and blank documents never enter a training stream; blank ones are
counted. A consumer whose share of a whole epoch holds no document raises instead of spinning forever.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from dlm.data_streams.sft import SftExample, detect_layout, encode_examples, example_of_row
from dlm.data_streams.shards import ShardSet
from dlm.data_streams.shuffle import IndexPermutation, derive_seed, plan_pieces, rng
from dlm.data_streams.sources import Piece, iter_piece_rows, piece_columns, text_of_row
from dlm.data_streams.split import text_hash
from dlm.data_streams.tokenizer import TokenizerInfo, encode_texts
from dlm.errors import DataError

Cursor = dict[str, int]
Unit = Union[str, SftExample]  # noqa: UP007 - a runtime alias
_ENCODE_BATCH = 32
_SHARD_CHUNK = 256
_HELD_OUT = object()


@dataclass
class Doc:
    """A tokenized document: ``tokens`` (the answer for SFT) and, for SFT, the ``prompt`` ids."""

    tokens: np.ndarray
    prompt: np.ndarray | None = None


@dataclass
class TextSource:
    """Text documents from pieces, as plain text (pretraining) or SFT examples, with the split threshold."""

    pieces: tuple[Piece, ...]
    tokenizer: TokenizerInfo
    eval_threshold: int
    text_column: str = "text"
    sft: bool = False
    sft_template: str = "plain"
    # SFT: each file's own layout and columns (by piece name), so alpaca and question/answer files mix
    sft_layouts: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.pieces:
            raise DataError("the data source holds no files; set data.paths to files that hold documents")

    def columns_of(self, piece: Piece) -> tuple[str, ...]:
        """The columns to read from ``piece``: the text column, or its SFT layout's columns."""
        return self.sft_layouts[piece.name][1] if self.sft else (self.text_column,)

    def unit_of_row(self, row: dict[str, Any], piece: Piece) -> Any:
        """The row's document or example; None when blank; ``_HELD_OUT`` when it belongs to the eval split."""
        unit: Unit | None
        if self.sft:
            example = example_of_row(row, self.sft_layouts[piece.name][0], piece.name)
            unit, key = example, (example.split_hash() if example is not None else 0)
        else:
            text = text_of_row(row, self.text_column, piece)
            unit, key = text, (text_hash(text) if text is not None else 0)
        if unit is None:
            return None
        return (_HELD_OUT, unit) if key < self.eval_threshold else unit

    def encode(self, units: Sequence[Unit]) -> list[Doc]:
        if self.sft:
            pairs = encode_examples(self.tokenizer, units, self.sft_template)  # type: ignore[arg-type]
            return [Doc(tokens=answer, prompt=prompt) for prompt, answer in pairs]
        return [Doc(tokens=t) for t in encode_texts(self.tokenizer, units)]  # type: ignore[arg-type]

    def natural_units(self) -> Iterator[tuple[bool, Unit]]:
        """Every non-blank document in source order with whether it is held out (the eval scan)."""
        for piece in self.pieces:
            for row in iter_piece_rows(piece, self.columns_of(piece), fix=self.column_fix()):
                unit = self.unit_of_row(row, piece)
                if unit is None:
                    continue
                if isinstance(unit, tuple):
                    yield True, unit[1]
                else:
                    yield False, unit

    def column_fix(self) -> str:
        """The advice a missing-column error gives for this kind of source."""
        if self.sft:
            return "every row of an SFT file needs the columns of its first row"
        return "set data.text_column to the column that holds the text"


def sft_layouts(pieces: Sequence[Piece]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The SFT layout and columns of every file (read once per file name, before any worker starts)."""
    layouts: dict[str, tuple[str, tuple[str, ...]]] = {}
    for piece in pieces:
        if piece.name not in layouts:
            layout, columns = detect_layout(piece_columns(piece), piece.name)
            layouts[piece.name] = (layout, tuple(columns))
    return layouts


class TextDocStream:
    """One consumer's stream over a :class:`TextSource` (see the module docstring)."""

    def __init__(self, source: TextSource, consumer: int, num_consumers: int, *, seed: int, shuffle: bool,
                 shuffle_buffer: int) -> None:
        self.source, self.consumer, self.num_consumers = source, consumer, num_consumers
        self.seed, self.shuffle, self.buffer = seed, shuffle, shuffle_buffer

    @staticmethod
    def start() -> Cursor:
        return {"epoch": 0, "piece": 0, "row": 0, "raw": 0, "pos": 0, "empty": 0}

    def _own_units(self, plan_pieces_: Sequence[int], stride: int, offset: int, piece_pos: int, row: int,
                   raw: int) -> Iterator[tuple[Any, tuple[int, int, int]]]:
        """This consumer's rows from (piece_pos, row) on, each with the position just after it."""
        for pos in range(piece_pos, len(plan_pieces_)):
            piece = self.source.pieces[plan_pieces_[pos]]
            index = row if pos == piece_pos else 0
            for values in iter_piece_rows(piece, self.source.columns_of(piece), index, fix=self.source.column_fix()):
                mine = raw % stride == offset
                raw += 1
                index += 1
                if mine:
                    yield self.source.unit_of_row(values, piece), (pos, index, raw)

    def iterate(self, cursor: Cursor) -> Iterator[tuple[Doc, Cursor, int]]:
        c = dict(cursor)
        num_pieces = len(self.source.pieces)
        while True:
            epoch = c["epoch"]
            order = rng(self.seed, "pieces", epoch).permutation(num_pieces) if self.shuffle else np.arange(num_pieces)
            plan = plan_pieces(num_pieces, self.num_consumers, self.consumer, order)
            whole_epoch = (c["piece"], c["row"], c["raw"], c["pos"]) == (0, 0, 0, 0)
            yielded = 0
            block_at = (c["piece"], c["row"], c["raw"])
            pos, empty_before = c["pos"], c["empty"]
            reader = self._own_units(plan.pieces, plan.stride, plan.offset, *block_at)
            exhausted = False
            while not exhausted:
                units: list[Unit] = []
                empties = 0
                after = block_at
                while len(units) < self.buffer:
                    item = next(reader, None)
                    if item is None:
                        exhausted = True
                        break
                    unit, after = item
                    if unit is None:
                        empties += 1
                    elif not isinstance(unit, tuple):
                        units.append(unit)
                if self.shuffle:
                    perm = rng(self.seed, "block", epoch, self.consumer, block_at[2]).permutation(len(units))
                else:
                    perm = np.arange(len(units))
                encoded: dict[int, Doc] = {}
                for i in range(pos, len(units)):
                    if i not in encoded:
                        batch = list(range(i, min(i + _ENCODE_BATCH, len(units))))
                        encoded = dict(zip(batch, self.source.encode([units[perm[j]] for j in batch])))
                    nxt = {"epoch": epoch, "piece": block_at[0], "row": block_at[1], "raw": block_at[2],
                           "pos": i + 1, "empty": empty_before}
                    yielded += 1
                    yield encoded[i], nxt, empty_before + empties
                empty_before += empties
                block_at, pos = after, 0
            if whole_epoch and yielded == 0:
                raise DataError(
                    f"data consumer {self.consumer} of {self.num_consumers} (rank x worker) got no training document "
                    f"in a whole epoch of {num_pieces} file(s); add data, lower data.eval_fraction, or use fewer "
                    "ranks or data.num_workers"
                )
            c = {"epoch": epoch + 1, "piece": 0, "row": 0, "raw": 0, "pos": 0, "empty": empty_before}


class ShardDocStream:
    """One consumer's stream over prepared token shards (see the module docstring)."""

    def __init__(self, shards: ShardSet, eval_threshold: int, consumer: int, num_consumers: int, *, seed: int,
                 shuffle: bool) -> None:
        self.shards, self.threshold = shards, np.uint64(eval_threshold)
        self.consumer, self.num_consumers = consumer, num_consumers
        self.seed, self.shuffle = seed, shuffle

    @staticmethod
    def start() -> Cursor:
        return {"epoch": 0, "pos": 0, "empty": 0}

    def iterate(self, cursor: Cursor) -> Iterator[tuple[Doc, Cursor, int]]:
        epoch, k = cursor["epoch"], cursor["pos"]
        n, stride = self.shards.num_docs, self.num_consumers
        count = max(0, -(-(n - self.consumer) // stride))  # positions consumer, consumer + C, ... below n
        starts = self.shards.starts
        while True:
            perm = IndexPermutation(n, derive_seed(self.seed, "docs", epoch)) if self.shuffle else None
            whole_epoch, yielded = k == 0, 0
            while k < count:
                ks = np.arange(k, min(k + _SHARD_CHUNK, count), dtype=np.int64)
                positions = self.consumer + ks * stride
                docs = perm(positions) if perm is not None else positions
                shard_ids = np.searchsorted(starts, docs, side="right") - 1
                shards = self.shards.shards()
                for kk, doc, sid in zip(ks.tolist(), docs.tolist(), shard_ids.tolist()):
                    shard, local = shards[sid], doc - int(starts[sid])
                    if shard.hashes[local] < self.threshold:
                        continue
                    tokens = shard.doc(local)
                    if tokens.size == 0:
                        continue
                    yielded += 1
                    yield Doc(tokens=tokens), {"epoch": epoch, "pos": kk + 1, "empty": 0}, 0
                k = int(ks[-1]) + 1
            if whole_epoch and yielded == 0:
                raise DataError(
                    f"data consumer {self.consumer} of {self.num_consumers} (rank x worker) got no training document "
                    f"in a whole epoch of the {n} documents in {self.shards.directory}; add data, lower "
                    "data.eval_fraction, or use fewer ranks or data.num_workers"
                )
            epoch, k = epoch + 1, 0

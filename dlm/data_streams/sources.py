"""Where documents come from: local parquet / jsonl / json / txt files and globs, or a Hugging Face hub
dataset, all read through ``datasets.load_dataset(..., streaming=True)``.

A source is split into :class:`Piece` s, the units that are read independently and sharded over ranks and
data-loader workers: one per local file, one per shard (``IterableDataset.num_shards``) of a hub dataset.
Nothing is materialised in a cache. ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are honoured by ``datasets``
itself: offline, a hub dataset opens from the local cache or fails at once, never waits on the network.

The library's own errors rarely say which file is broken, so every failure becomes a
:class:`~dlm.errors.DataError` that names the file (or hub shard) and the fix.
"""

from __future__ import annotations

import glob
import gzip
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from dlm.errors import DataError

_FORMATS: dict[str, str] = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".txt": "text",
}
_READ_ERRORS = (
    ValueError,  # includes UnicodeDecodeError (invalid UTF-8) and JSON decode errors
    OSError,
    KeyError,
    TypeError,
    RuntimeError,
    pa.ArrowException,
    datasets.exceptions.DatasetsError,
)
_READ_BATCH = 256
_TEXT_FIX = "set data.text_column to the column that holds the text"


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face hub, e.g. ``HuggingFaceFW/fineweb`` with config ``sample-10BT``."""

    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None

    def describe(self) -> str:
        return f"hub dataset {self.name}" + (f" ({self.config})" if self.config else "") + f" split {self.split}"


@dataclass(frozen=True)
class Piece:
    """One independently readable part of a source: a local file, or one shard of a hub dataset.

    ``limit`` caps the rows read from it (``data.max_docs`` keeps the first documents of a source).
    """

    name: str
    builder: str  # parquet | json | text | hub
    path: str | None = None
    hub: HubDataset | None = None
    shard: int = 0
    num_shards: int = 1
    limit: int | None = None


def detect_format(path: Path) -> str:
    """The ``datasets`` builder for a file, from its extension: ``parquet``, ``json`` or ``text``."""
    name = path.name.lower()
    for suffix in sorted(_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return _FORMATS[suffix]
    raise DataError(
        f"cannot read {path}: unsupported extension; use files ending in {', '.join(_FORMATS)} "
        "(one document per row, or per line for .txt)"
    )


def _is_supported(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in _FORMATS)


def resolve_files(patterns: Sequence[str]) -> list[Path]:
    """Expand globs (``**`` recurses), plain file paths and directories into a sorted list without duplicates.

    A directory stands for every supported file below it. A pattern that matches no file is an error rather
    than silently training on less data than asked for.
    """
    if isinstance(patterns, (str, Path)):
        patterns = [str(patterns)]
    if not patterns:
        raise DataError("no data paths given; set data.paths to one or more files or globs (e.g. data/*.parquet)")
    found: set[Path] = set()
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        if glob.has_magic(expanded):
            matches = [Path(m) for m in glob.glob(expanded, recursive=True)]
        else:
            matches = [Path(expanded)]
        files: list[Path] = []
        for match in matches:
            if match.is_file():
                files.append(match)
            elif match.is_dir():
                files.extend(p for p in match.rglob("*") if p.is_file() and _is_supported(p))
        if not files:
            raise DataError(
                f"data path {pattern!r} matches no file (cwd {Path.cwd()}); fix the path or glob in data.paths "
                "(relative paths start at the cwd)"
            )
        found.update(f.resolve() for f in files)
    return sorted(found)


def file_pieces(files: Sequence[Path]) -> list[Piece]:
    """One piece per file, in the given order; an unsupported extension is an error naming the file."""
    return [Piece(name=str(f), builder=detect_format(Path(f)), path=str(f)) for f in files]


_HUB_CACHE: dict[HubDataset, datasets.IterableDataset] = {}


def _hub_error(hub: HubDataset, exc: BaseException) -> DataError:
    detail = " ".join(str(exc).split())[:300]
    return DataError(
        f"cannot open {hub.describe()} ({type(exc).__name__}: {detail}); check data.hub_name and data.hub_config, "
        "and with HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set make sure the dataset is in the local cache"
    )


def open_hub(hub: HubDataset) -> datasets.IterableDataset:
    """The streaming dataset, opened once per process (opening resolves the file list over the network)."""
    if hub not in _HUB_CACHE:
        try:
            _HUB_CACHE[hub] = datasets.load_dataset(
                hub.name, hub.config, split=hub.split, revision=hub.revision, streaming=True
            )
        except Exception as exc:  # datasets raises ConnectionError, DatasetNotFoundError, ValueError, ...
            raise _hub_error(hub, exc) from exc
    return _HUB_CACHE[hub]


def hub_pieces(hub: HubDataset) -> list[Piece]:
    """One piece per shard of the hub dataset (its data files), in the dataset's order."""
    count = open_hub(hub).num_shards
    return [
        Piece(name=f"{hub.describe()} shard {i} of {count}", builder="hub", hub=hub, shard=i, num_shards=count)
        for i in range(count)
    ]


def _is_empty_file(path: str) -> bool:
    try:
        return Path(path).stat().st_size == 0
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); fix the path in data.paths or restore the file") from exc


def _missing_column(where: str, column: str, present: Sequence[str], fix: str) -> DataError:
    return DataError(f"{where} has no column {column!r} (columns: {', '.join(present) or 'none'}); {fix}")


def _open_piece(piece: Piece, columns: Sequence[str], fix: str) -> datasets.IterableDataset | None:
    """The piece as a streaming dataset of ``columns`` only (``text`` for .txt); None for an empty text file."""
    if piece.builder == "hub":
        assert piece.hub is not None
        ds = open_hub(piece.hub).shard(num_shards=piece.num_shards, index=piece.shard, contiguous=True)
    elif piece.builder == "parquet":
        # The schema check reads only the footer; asking the builder for the columns skips decoding the rest.
        present = pq.read_schema(piece.path).names
        for column in columns:
            if column not in present:
                raise _missing_column(piece.name, column, present, fix)
        return datasets.load_dataset(
            "parquet", data_files=[piece.path], split="train", streaming=True, columns=list(columns)
        )
    else:
        # An empty text or JSON Lines file simply holds no documents (the json builder chokes on it).
        if _is_empty_file(str(piece.path)):
            return None
        ds = datasets.load_dataset(piece.builder, data_files=[piece.path], split="train", streaming=True)
        if piece.builder == "text":
            return ds
    if ds.column_names is not None:
        for column in columns:
            if column not in ds.column_names:
                raise _missing_column(piece.name, column, ds.column_names, fix)
        ds = ds.select_columns(list(columns))
    return ds


def iter_piece_rows(
    piece: Piece, columns: Sequence[str], start: int = 0, fix: str = _TEXT_FIX
) -> Iterator[dict[str, Any]]:
    """Stream the rows of one piece from row ``start`` on, as dicts of ``columns``.

    A ``.txt`` piece has no columns: each line is a row ``{"text": line}`` whatever ``columns`` says.
    Any read failure becomes a DataError naming the piece; ``fix`` is the advice for a missing column.
    """
    text_file = piece.builder == "text"
    wanted = ["text"] if text_file else list(columns)
    stop = piece.limit
    if stop is not None and start >= stop:
        return
    try:
        ds = _open_piece(piece, wanted, fix)
        if ds is None:
            return
        if start:
            ds = ds.skip(start)
        index = start
        for batch in ds.iter(batch_size=_READ_BATCH):
            keys = list(batch)
            for column in wanted:
                if column not in batch:
                    raise _missing_column(piece.name, column, keys, fix)
            values = [batch[c] for c in wanted]
            for row in zip(*values):
                if stop is not None and index >= stop:
                    return
                index += 1
                yield dict(zip(wanted, row))
    except DataError:
        raise
    except _READ_ERRORS as exc:
        if piece.hub is not None:
            raise _hub_error(piece.hub, exc) from exc
        detail = " ".join(str(exc).split())[:300]
        raise DataError(
            f"cannot read {piece.name} as {piece.builder} ({type(exc).__name__}: {detail}); replace or remove the "
            "file, or fix its extension"
        ) from exc


def piece_columns(piece: Piece) -> list[str]:
    """The column names of a piece (a parquet footer, the dataset's features, or the first row's keys)."""
    if piece.builder == "text":
        return ["text"]
    try:
        if piece.builder == "parquet":
            return list(pq.read_schema(piece.path).names)
        if piece.hub is not None:
            ds = open_hub(piece.hub)
        elif _is_empty_file(str(piece.path)):
            return []
        else:
            ds = datasets.load_dataset(piece.builder, data_files=[piece.path], split="train", streaming=True)
        if ds.column_names is not None:
            return list(ds.column_names)
        return list(next(iter(ds), {}))
    except DataError:
        raise
    except _READ_ERRORS as exc:
        detail = " ".join(str(exc).split())[:300]
        raise DataError(
            f"cannot read {piece.name} ({type(exc).__name__}: {detail}); replace or remove the file"
        ) from exc


def count_rows(piece: Piece) -> int | None:
    """Rows in a local piece without decoding it (parquet footer, or lines of a text/JSON Lines file), for
    progress bars; None when that is unknown (hub shards, JSON arrays)."""
    if piece.path is None:
        return None
    name = piece.path.lower()
    try:
        if piece.builder == "parquet":
            rows = pq.ParquetFile(piece.path).metadata.num_rows
        elif piece.builder == "text" or name.endswith((".jsonl", ".jsonl.gz")):
            with (gzip.open if name.endswith(".gz") else open)(piece.path, "rb") as fh:
                rows = sum(1 for line in fh if line.strip() or piece.builder == "text")
        else:
            return None
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read {piece.name} ({type(exc).__name__}: {exc}); replace or remove the file") from exc
    return rows if piece.limit is None else min(rows, piece.limit)


def limit_pieces(
    pieces: Sequence[Piece], max_docs: int, columns: Sequence[str] | Callable[[Piece], Sequence[str]]
) -> list[Piece]:
    """Keep only the first ``max_docs`` rows of the source in piece order (reads at most that many rows).

    ``columns`` are the columns to read, or a function giving them per piece (SFT files of several layouts)."""
    kept: list[Piece] = []
    remaining = max_docs
    for piece in pieces:
        if remaining <= 0:
            break
        wanted = columns(piece) if callable(columns) else columns
        rows = sum(1 for _ in iter_piece_rows(replace(piece, limit=remaining), wanted))
        if rows:
            kept.append(replace(piece, limit=rows) if rows == remaining else piece)
        remaining -= rows
    return kept


def _text_of(row: dict[str, Any], column: str, where: str) -> str | None:
    """The row's text, or None for a missing/blank one (skipped and counted by the caller)."""
    text = row.get(column)
    if text is None:
        return None
    if not isinstance(text, str):
        raise DataError(
            f"{where}: column {column!r} holds {type(text).__name__} values, not text; set data.text_column to a "
            "string column"
        )
    return text if text.strip() else None


def text_of_row(row: dict[str, Any], column: str, piece: Piece) -> str | None:
    """Public form of :func:`_text_of` for the document streams: ``.txt`` rows always use ``text``."""
    return _text_of(row, "text" if piece.builder == "text" else column, piece.name)


def iter_documents(files: Sequence[Path], text_column: str = "text") -> Iterator[str]:
    """Yield the non-blank documents of ``files`` in file order: the ``text_column`` of each row, or each line
    of a .txt file."""
    for piece in file_pieces(files):
        for row in iter_piece_rows(piece, [text_column]):
            text = text_of_row(row, text_column, piece)
            if text is not None:
                yield text

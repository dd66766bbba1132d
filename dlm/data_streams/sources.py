"""Find data files and stream their documents as plain strings.

Every format goes through ``datasets.load_dataset(..., streaming=True)`` so that local files and, later, hub
datasets share one code path and nothing is materialised in a cache. The library's own errors rarely say
which file is broken, so each failure is turned into a :class:`~dlm.errors.DataError` that names it.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

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
    ValueError,
    OSError,
    KeyError,
    TypeError,
    RuntimeError,
    pa.ArrowException,
    datasets.exceptions.DatasetsError,
)


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


def _group_by_format(files: Sequence[Path]) -> list[tuple[str, list[Path]]]:
    """Files grouped by builder, groups ordered by each format's first file, files kept in order within a group."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(detect_format(Path(path)), []).append(Path(path))
    return list(groups.items())


def _open_stream(builder: str, files: list[Path]) -> datasets.IterableDataset:
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)


def _missing_column(path: str, column: str, present: Sequence[str]) -> DataError:
    return DataError(
        f"{path} has no column {column!r} (columns: {', '.join(present) or 'none'}); set data.text_column to the "
        "column that holds the text"
    )


def _text_of(example: dict[str, Any], column: str, where: str) -> str | None:
    if column not in example:
        raise _missing_column(where, column, list(example))
    text = example[column]
    if text is None:
        return None
    if not isinstance(text, str):
        raise DataError(
            f"{where}: column {column!r} holds {type(text).__name__} values, not text; set data.text_column to a "
            "string column"
        )
    return text if text.strip() else None


def _stream_group(builder: str, files: list[Path], column: str) -> Iterator[str]:
    """Stream one format's files together; on any failure, find and name the file responsible."""
    where = str(files[0]) if len(files) == 1 else f"one of {len(files)} {builder} files"
    try:
        stream = _open_stream(builder, files)
        if stream.column_names is not None and column not in stream.column_names:
            raise _missing_column(where, column, stream.column_names)
        for example in stream:
            text = _text_of(example, column, where)
            if text is not None:
                yield text
    except (DataError, *_READ_ERRORS) as exc:
        if len(files) > 1:
            _raise_for_bad_file(builder, files, column)
        if isinstance(exc, DataError):
            raise
        detail = " ".join(str(exc).split())[:300]
        raise DataError(
            f"cannot read {files[0]} as {builder} ({type(exc).__name__}: {detail}); replace or remove the file, "
            "or fix its extension"
        ) from exc


def _raise_for_bad_file(builder: str, files: list[Path], column: str) -> None:
    """Re-stream the files one at a time so the error names the one that is broken (error path only)."""
    for path in files:
        for _ in _stream_group(builder, [path], column):
            pass
    raise DataError(
        f"the {builder} files {', '.join(map(str, files))} fail when read together but not one by one, so their "
        "columns or column types differ; rewrite them with one schema"
    )


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); fix the path in data.paths or restore the file") from exc


def iter_documents(files: Sequence[Path], text_column: str = "text") -> Iterator[str]:
    """Yield the non-blank documents of ``files``: the ``text_column`` of each row, or each line of a .txt file.

    Files of one format are streamed together; formats follow each other in the order of their first file.
    A ``.txt`` file has no columns, so its lines are documents whatever ``text_column`` says.
    """
    for builder, group in _group_by_format(files):
        if builder != "parquet":
            # An empty text or JSON Lines file simply holds no documents (the json builder chokes on it); an
            # empty parquet file is a broken one and is left to fail with its name.
            group = [f for f in group if not _is_empty(f)]
            if not group:
                continue
        column = "text" if builder == "text" else text_column
        yield from _stream_group(builder, group, column)

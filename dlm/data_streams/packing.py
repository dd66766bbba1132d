"""Pack tokenized documents into fixed-length rows with per-row document ids.

Pretraining rows are dense (no padding): documents are concatenated, each closed by EOS, and the stream is
cut every ``seq_len`` tokens. The document ids let attention stay inside a document and are numbered from 0
within each row so that a row never depends on how many documents came before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def pack(token_docs: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``(input_ids, doc_ids)`` rows of exactly ``seq_len`` tokens; the final partial row is dropped.

    The EOS after a document belongs to that document. A document cut at a row boundary continues at the
    start of the next row with doc id 0.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    row: list[int] = []
    row_docs: list[int] = []
    doc = 0
    for tokens in token_docs:
        stream = [*tokens, eos_id]
        pos = 0
        while pos < len(stream):
            take = min(seq_len - len(row), len(stream) - pos)
            row.extend(stream[pos : pos + take])
            row_docs.extend([doc] * take)
            pos += take
            if len(row) == seq_len:
                yield row, row_docs
                row, row_docs, doc = [], [], 0
        if row:
            doc += 1

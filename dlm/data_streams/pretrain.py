"""The minimal in-memory pretraining data path: read, split by document, tokenize, pack, serve batches.

Everything is held as int64 tensors, which suits the bundled sample and small local corpora; streaming,
sharding by rank and resumable loaders for large corpora are a separate layer built on the same pieces
(:mod:`~dlm.data_streams.sources`, :mod:`~dlm.data_streams.packing`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import torch
from tqdm import tqdm

from dlm.data_streams.packing import pack
from dlm.data_streams.sources import iter_documents, resolve_files
from dlm.data_streams.tokenizer import TokenizerInfo
from dlm.errors import ConfigError, DataError

_TOKENIZE_BATCH = 256
_HASH_RANGE = 2**64


@dataclass
class PretrainData:
    """Packed train and held-out rows plus the train unigram counts that give the loss a baseline."""

    train_rows: torch.LongTensor
    train_doc_ids: torch.LongTensor
    eval_rows: torch.LongTensor
    eval_doc_ids: torch.LongTensor
    unigram_counts: torch.LongTensor
    num_train_docs: int
    num_eval_docs: int

    @property
    def seq_len(self) -> int:
        """Tokens per packed row."""
        return int(self.train_rows.shape[1])

    def unigram_cross_entropy(self) -> float:
        """Nats per eval token under add-one smoothed train unigram frequencies.

        A model that has learned only how often each token occurs reaches this loss and no lower, so a
        training run whose masked-token loss is not clearly below it has learned nothing about context.
        """
        counts = self.unigram_counts.to(torch.float64)
        log_probs = torch.log((counts + 1.0) / (counts.sum() + counts.numel()))
        return float(-log_probs[self.eval_rows.reshape(-1)].mean())

    def train_batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled batches; batch ``k`` is the same for a given seed whether reached by iterating or by
        ``start_step=k``, which is what lets a resumed run see exactly the data the uninterrupted one would.

        Epoch ``e`` visits rows in ``torch.randperm`` order from a generator seeded by ``(seed, e)``; the
        incomplete last batch of each epoch is dropped so every batch has ``batch_size`` rows.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be non-negative, got {start_step}")
        num_rows = int(self.train_rows.shape[0])
        per_epoch = num_rows // batch_size
        if per_epoch == 0:
            raise DataError(
                f"the micro-batch of {batch_size} rows is larger than the {num_rows} packed train rows; lower the "
                "batch size or data.seq_len, or add more data"
            )
        epoch, skip = divmod(start_step, per_epoch)
        while True:
            order = torch.randperm(num_rows, generator=_epoch_generator(seed, epoch))
            for batch in range(skip, per_epoch):
                index = order[batch * batch_size : (batch + 1) * batch_size]
                yield {"input_ids": self.train_rows[index], "doc_ids": self.train_doc_ids[index]}
            skip = 0
            epoch += 1

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """All eval rows in order, once; the last batch may be smaller so that every held-out row counts."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, int(self.eval_rows.shape[0]), batch_size):
            stop = start + batch_size
            yield {"input_ids": self.eval_rows[start:stop], "doc_ids": self.eval_doc_ids[start:stop]}


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Whether a document is held out: a hash of its text, so the split ignores file order and duplicates
    of one text always land on the same side."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < eval_fraction * _HASH_RANGE


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _packed_tensors(
    docs: list[list[int]], seq_len: int, eos_id: int, split: str, eval_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, doc_ids = [], []
    for row, row_docs in pack(docs, seq_len, eos_id):
        rows.append(row)
        doc_ids.append(row_docs)
    if not rows:
        num_tokens = sum(len(d) + 1 for d in docs)
        raise DataError(
            f"the {split} split holds {num_tokens} tokens from {len(docs)} documents, less than one row of "
            f"data.seq_len={seq_len}; lower data.seq_len, change data.eval_fraction (now {eval_fraction}), "
            "or add more data"
        )
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(doc_ids, dtype=torch.int64)


def load_pretrain_data(
    patterns: Sequence[str],
    tokenizer: TokenizerInfo,
    seq_len: int,
    text_column: str = "text",
    eval_fraction: float = 0.05,
    max_docs: int | None = None,
    show_progress: bool = True,
) -> PretrainData:
    """Read the files ``patterns`` name, hold out documents by hash, tokenize, and pack both splits.

    ``max_docs`` keeps only the first documents in file order (before the split), for quick runs.
    """
    if seq_len < 1:
        raise ConfigError(f"data.seq_len must be at least 1, got {seq_len}; set it to a positive number of tokens")
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must lie strictly between 0 and 1, got {eval_fraction}; e.g. set 0.05")
    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"data.max_docs must be at least 1, got {max_docs}; set a positive count or leave it unset")
    documents: Iterable[str] = iter_documents(resolve_files(patterns), text_column)
    if max_docs is not None:
        documents = islice(documents, max_docs)

    train_docs: list[list[int]] = []
    eval_docs: list[list[int]] = []
    with tqdm(total=max_docs, desc="tokenizing", unit="doc", disable=not show_progress) as progress:
        for texts in _batched(documents, _TOKENIZE_BATCH):
            # verbose=False: documents longer than the tokenizer's model_max_length are expected; packing cuts them.
            encoded = tokenizer.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            for text, tokens in zip(texts, encoded):
                (eval_docs if is_eval_document(text, eval_fraction) else train_docs).append(tokens)
            progress.update(len(texts))

    train_rows, train_doc_ids = _packed_tensors(train_docs, seq_len, tokenizer.eos_id, "train", eval_fraction)
    eval_rows, eval_doc_ids = _packed_tensors(eval_docs, seq_len, tokenizer.eos_id, "eval", eval_fraction)
    return PretrainData(
        train_rows=train_rows,
        train_doc_ids=train_doc_ids,
        eval_rows=eval_rows,
        eval_doc_ids=eval_doc_ids,
        unigram_counts=torch.bincount(train_rows.reshape(-1), minlength=tokenizer.vocab_size),
        num_train_docs=len(train_docs),
        num_eval_docs=len(eval_docs),
    )

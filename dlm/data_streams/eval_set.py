"""The held-out rows and the unigram baseline, from one pass over the start of the source in file order.

The scan stops as soon as it has ``max_rows`` held-out rows and a large enough sample of training tokens for
the unigram counts, so it costs seconds even on a hub corpus of billions of tokens, and every rank computes
the same set. Eval rows use the training format at the configured ``seq_len``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch

from dlm.data_streams.documents import Doc
from dlm.data_streams.format_specs import data_format
from dlm.data_streams.formats import format_all
from dlm.errors import DataError

UNIGRAM_SAMPLE_TOKENS = 2_000_000
"""Training tokens counted for the unigram baseline (the whole training split when it is smaller)."""
_SCAN_BATCH = 64


@dataclass
class EvalSet:
    """Held-out rows (in source order) and train-set unigram counts that give the loss a baseline."""

    rows: dict[str, np.ndarray]
    unigram_counts: np.ndarray
    num_docs: int

    @property
    def num_rows(self) -> int:
        return int(self.rows["input_ids"].shape[0])

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """All eval rows in order, once; the last batch may be smaller so that every held-out row counts."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, self.num_rows, batch_size):
            yield {k: torch.from_numpy(v[start : start + batch_size]) for k, v in self.rows.items()}

    def unigram_cross_entropy(self, rows: int | None = None) -> float:
        """Nats per scored eval token under add-one smoothed train unigram frequencies.

        A model that has learned only how often each token occurs reaches this loss and no lower, so a
        training run whose masked-token loss is not clearly below it has learned nothing about context.
        Scored tokens are all tokens, or the non-prompt ones for SFT; ``rows`` limits them to the first rows,
        the ones an evaluation of that many rows scores, so the two figures compare the same tokens.
        """
        kept = self.rows if rows is None else {k: v[:rows] for k, v in self.rows.items()}
        return float(-self.unigram_log_probs()[_scored(kept)].mean())

    def unigram_log_probs(self) -> np.ndarray:
        """Add-one smoothed log frequencies ``[V]`` of the scored train tokens: the unigram model itself, and
        the starting point of an LM head's ``output_bias`` (``model.output_bias_init: unigram``)."""
        counts = self.unigram_counts.astype(np.float64)
        return np.log((counts + 1.0) / (counts.sum() + counts.size))


def _scored(rows: dict[str, np.ndarray]) -> np.ndarray:
    ids = rows["input_ids"]
    return ids[~rows["prompt_mask"]] if "prompt_mask" in rows else ids.reshape(-1)


def build_eval_set(
    units: Iterable[tuple[bool, Any]],
    encode: Callable[[Sequence[Any]], list[Doc]],
    *,
    fmt: str,
    seq_len: int,
    eos_id: int,
    pad_id: int,
    overflow: str,
    vocab_size: int,
    max_rows: int,
    eval_fraction: float,
) -> EvalSet:
    """Scan ``units`` ((held_out, document) pairs in source order), encoding only what is needed."""
    eval_docs: list[Doc] = []
    train_docs: list[Doc] = []
    packed = data_format(fmt).packed  # a packed held-out set is measured in tokens, others in rows
    eval_need = max_rows * seq_len if packed else max_rows
    eval_have, train_tokens = 0, 0
    iterator = iter(units)
    while chunk := list(islice(iterator, _SCAN_BATCH)):
        if eval_have < eval_need:
            docs = encode([u for held_out, u in chunk if held_out])
            eval_docs += docs
            eval_have += sum(len(d.tokens) + 1 for d in docs) if packed else len(docs)
        if train_tokens < UNIGRAM_SAMPLE_TOKENS:
            docs = encode([u for held_out, u in chunk if not held_out])
            train_docs += docs
            train_tokens += sum(len(d.tokens) + 1 + (0 if d.prompt is None else len(d.prompt)) for d in docs)
        if eval_have >= eval_need and train_tokens >= UNIGRAM_SAMPLE_TOKENS:
            break

    splits = {}
    for split, docs in (("train", train_docs), ("eval", eval_docs)):
        rows, _ = format_all(fmt, docs, seq_len, eos_id, pad_id, overflow)
        if not rows:
            tokens = sum(len(d.tokens) + 1 + (0 if d.prompt is None else len(d.prompt)) for d in docs)
            raise DataError(
                f"the {split} split holds {tokens} tokens from {len(docs)} documents, less than one row of "
                f"data.seq_len={seq_len} in format {fmt}; lower data.seq_len, change data.eval_fraction (now "
                f"{eval_fraction}), or add more data"
            )
        splits[split] = rows
    eval_rows = {k: v[:max_rows] for k, v in splits["eval"].items()}
    counts = np.bincount(_scored(splits["train"]), minlength=vocab_size).astype(np.int64)
    return EvalSet(rows=eval_rows, unigram_counts=counts, num_docs=len(eval_docs))

"""Data for training: sources → tokenize → rows → shard by rank/worker → a resumable loader; token shards.

The training loop uses one function and one object:

``build_pretrain_stream(data, tokenizer, *, seed, micro_batch_size, rank=0, world_size=1, num_workers=None)``
    → :class:`TrainStream` for the ``data`` config section (:class:`dlm.data_streams.config.DataSection`).

``TrainStream``
    - ``next(stream)``: a dict of tensors ``[B, T]``: ``input_ids`` and ``doc_ids`` (int64); ``format=rows`` adds
      ``answer_length [B]`` (the document's true length), ``format=sft`` adds ``prompt_mask`` (bool) and
      ``answer_length [B]`` (the answer's true length, before EOS padding or any cut).
    - ``state_dict()`` / ``load_state_dict(state)``: resume at exactly the next batch (plain Python values;
      any worker count, shuffled or not). The state also pins seed, rank, world size and num_workers.
    - ``set_seq_len(n)``: from the next batch on, rows of ``n`` tokens and ``B * T / n`` rows per batch.
    - ``eval_batches(batch_size)``, ``unigram_cross_entropy()``, ``unigram_log_probs()``, ``num_eval_rows``: the
      held-out rows, the unigram baseline and the train tokens' log frequencies; ``counters()``: documents
      used, blank ones skipped, too-long ones dropped or cut.
    - ``close()``: stop worker processes.

``validate_data_source(data, tokenizer)`` checks a source cheaply before a run directory exists.
``prepare_shards(...)`` / ``shard_stats(...)`` back ``dlm data prepare`` and ``dlm data stats``.

Guarantees: in every epoch each training document goes to exactly one (rank, worker), for any world size
and worker count (also with fewer files than ranks × workers); the order is a pure function of
(seed, epoch); the packed rows of one batch come from different documents (one packing lane per row of the
first micro-batch); the held-out split is a hash of each document's text, identical for text and shards.

The exports are imported on first use (:mod:`dlm.lazy`), so that :mod:`dlm.config` can import this package's
sections (:mod:`dlm.data_streams.config`) without loading tokenizers, datasets and data loaders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlm.lazy import lazy_exports

if TYPE_CHECKING:
    from dlm.data_streams.formats import FORMATS, pack
    from dlm.data_streams.prepare import format_stats, parse_source, prepare_shards, shard_stats
    from dlm.data_streams.shards import ShardSet, read_index
    from dlm.data_streams.sources import HubDataset, detect_format, iter_documents, resolve_files
    from dlm.data_streams.split import is_eval_document
    from dlm.data_streams.stream import TrainStream, build_pretrain_stream, open_source, validate_data_source
    from dlm.data_streams.tokenizer import (
        TokenizerInfo,
        bundled_tokenizer_dir,
        check_vocab,
        encode_texts,
        load_tokenizer,
        tokenizer_fingerprint,
    )

__all__ = [
    "FORMATS",
    "HubDataset",
    "ShardSet",
    "TokenizerInfo",
    "TrainStream",
    "build_pretrain_stream",
    "bundled_tokenizer_dir",
    "check_vocab",
    "detect_format",
    "encode_texts",
    "format_stats",
    "is_eval_document",
    "iter_documents",
    "load_tokenizer",
    "open_source",
    "pack",
    "parse_source",
    "prepare_shards",
    "read_index",
    "resolve_files",
    "shard_stats",
    "tokenizer_fingerprint",
    "validate_data_source",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "dlm.data_streams.formats": ("FORMATS", "pack"),
        "dlm.data_streams.prepare": ("format_stats", "parse_source", "prepare_shards", "shard_stats"),
        "dlm.data_streams.shards": ("ShardSet", "read_index"),
        "dlm.data_streams.sources": ("HubDataset", "detect_format", "iter_documents", "resolve_files"),
        "dlm.data_streams.split": ("is_eval_document",),
        "dlm.data_streams.stream": ("TrainStream", "build_pretrain_stream", "open_source", "validate_data_source"),
        "dlm.data_streams.tokenizer": (
            "TokenizerInfo", "bundled_tokenizer_dir", "check_vocab", "encode_texts", "load_tokenizer",
            "tokenizer_fingerprint",
        ),
    },
)

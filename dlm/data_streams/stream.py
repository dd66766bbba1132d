"""The training stream: batches for one rank from any source and format, through torchdata's
``StatefulDataLoader``, resumable to the exact batch and able to change ``seq_len`` between two steps.

Each (rank, worker) pair is one *consumer* ``c = rank * W + worker`` of ``C = world_size * W`` (``W`` =
``max(1, num_workers)``); it builds whole batches from its own document stream
(:mod:`~dlm.data_streams.documents`) and the loader takes them from the workers in turn. The loader's
``state_dict`` holds each worker's read-head state (a cursor of a few ints, the offset into the current
document, counters) as of the last batch handed out, so resuming replays nothing and prefetched batches
are never lost. The data order depends on ``(seed, world_size, num_workers)``; resuming checks all three.

Handing a tensor from a worker process to the loop costs about a millisecond whatever its size (shared-memory
file, descriptor passing, queue), which caps token shards at a few M tokens/s per batch. So a worker hands
over a *bundle* of batches at a time, together with its read-head state after each of them. Bundles grow
1, 1, 2, 4 … up to ``K`` (``data.worker_batches``) and stay there — they end where the worker's own batch count
reaches :func:`bundle_end` — so the first batch does not wait for ``K`` of them; the workers take turns bundle
by bundle. A state taken in the middle of a bundle is the loader state from before the bundle with that
worker's read head moved to the last batch served; the worker then makes the rest of its bundle first, so the
order an uninterrupted run sees is kept exactly.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from dlm.data_streams.documents import Doc, ShardDocStream, TextDocStream, TextSource, sft_layouts
from dlm.data_streams.eval_set import EvalSet, build_eval_set
from dlm.data_streams.format_specs import data_format
from dlm.data_streams.formats import DocFeed, make_batch
from dlm.data_streams.shards import ShardSet
from dlm.data_streams.sources import HubDataset, file_pieces, hub_pieces, limit_pieces, resolve_files
from dlm.data_streams.split import eval_threshold
from dlm.data_streams.tokenizer import TokenizerInfo
from dlm.errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    from dlm.data_streams.config import DataSection

STATE_VERSION = 1
_ITERATOR_MARK = "dlm_batch_iterator"
BUNDLE_TOKENS = 1 << 18
MAX_BUNDLE = 64


def bundle_size(worker_batches: int | None, num_workers: int, tokens_per_batch: int) -> int:
    """Batches per worker hand-off: 1 in-process; else the configured count, or enough batches for about
    ``BUNDLE_TOKENS`` tokens (at most ``MAX_BUNDLE``) so that the fixed cost of a hand-off is shared."""
    if num_workers == 0:
        return 1
    if worker_batches is not None:
        return worker_batches
    return max(1, min(MAX_BUNDLE, math.ceil(BUNDLE_TOKENS / tokens_per_batch)))


def bundle_end(count: int, size: int) -> int:
    """Where the bundle of a worker that has made ``count`` batches ends: the next power of two while below
    ``size`` (a slow start: 1, 2, 4 …), then the next multiple of ``size``."""
    if count < size:
        return min(1 << count.bit_length(), size)
    return (count // size + 1) * size


@dataclass
class StreamSpec:
    """Everything a worker needs to build its consumer's batches; cheap to pickle (no open files)."""

    source: TextSource | ShardSet
    fmt: str
    eos_id: int
    pad_id: int
    overflow: str
    seed: int
    shuffle: bool
    shuffle_buffer: int
    eval_threshold: int
    rank: int
    world_size: int
    lanes: int = 1

    def doc_stream(self, consumer: int, num_consumers: int) -> TextDocStream | ShardDocStream:
        if isinstance(self.source, ShardSet):
            return ShardDocStream(self.source, self.eval_threshold, consumer, num_consumers, seed=self.seed,
                                  shuffle=self.shuffle)
        return TextDocStream(self.source, consumer, num_consumers, seed=self.seed, shuffle=self.shuffle,
                             shuffle_buffer=self.shuffle_buffer)


class BatchIterator:
    """One consumer's endless batches; ``state_dict`` is its read head (torchdata saves it per worker)."""

    def __init__(self, spec: StreamSpec, consumer: int, num_consumers: int, rows: int, seq_len: int) -> None:
        self.spec, self.consumer, self.num_consumers = spec, consumer, num_consumers
        self.rows, self.seq_len = rows, seq_len
        self.stream = spec.doc_stream(consumer, num_consumers)
        self.feed = DocFeed(self.stream, self.stream.start(), lanes=spec.lanes)
        self.batches = 0

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        s = self.spec
        batch = make_batch(s.fmt, self.feed, self.rows, self.seq_len, s.eos_id, s.pad_id, s.overflow)
        self.batches += 1
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return {_ITERATOR_MARK: STATE_VERSION, "consumer": self.consumer, "num_consumers": self.num_consumers,
                "batches": self.batches, **self.feed.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("consumer"), state.get("num_consumers")) != (self.consumer, self.num_consumers):
            raise DataError(
                f"data state of consumer {state.get('consumer')} of {state.get('num_consumers')} loaded into consumer "
                f"{self.consumer} of {self.num_consumers}; resume with the same world size and data.num_workers"
            )
        self.feed = DocFeed(self.stream, state["cursor"], lanes=len(state["lanes"]), state=state)
        self.batches = int(state["batches"])


class BundleIterator:
    """A worker's hand-offs: its next batches up to :func:`bundle_end` of its own batch count, stacked per key,
    with the read-head state after each batch (what a mid-bundle ``state_dict`` needs)."""

    def __init__(self, inner: BatchIterator, size: int) -> None:
        self.inner, self.size = inner, size

    def __iter__(self) -> BundleIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        batches, states = [], []
        for _ in range(bundle_end(self.inner.batches, self.size) - self.inner.batches):
            batches.append(next(self.inner))
            states.append(self.inner.state_dict())
        return {"batches": {k: torch.stack([b[k] for b in batches]) for k in batches[0]}, "states": states}

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class BatchDataset(IterableDataset):
    """The per-worker entry point: works out this worker's consumer index and hands out its bundles."""

    def __init__(self, spec: StreamSpec, rows: int, seq_len: int, bundle: int = 1) -> None:
        super().__init__()
        self.spec, self.rows, self.seq_len, self.bundle = spec, rows, seq_len, bundle

    def batch_iterator(self) -> BatchIterator:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumer = self.spec.rank * workers + worker
        return BatchIterator(self.spec, consumer, self.spec.world_size * workers, self.rows, self.seq_len)

    def __iter__(self) -> BatchIterator | BundleIterator:
        # One batch per hand-off is never left half-served: the loader's own state is the read head after it.
        inner = self.batch_iterator()
        return inner if self.bundle == 1 else BundleIterator(inner, self.bundle)


def _one_line(exc: UserError) -> str:
    """A DataLoader worker re-raises our error with its whole traceback in the message; keep our line."""
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    lines = str(exc).strip().splitlines()
    found = [line[len(prefix) :] for line in lines if line.startswith(prefix)]
    return found[-1] if found else (lines[-1] if lines else "")


def _iterator_states(tree: Any) -> list[dict[str, Any]]:
    """Every consumer state inside a loader state dict, wherever torchdata nests it."""
    if isinstance(tree, dict):
        if _ITERATOR_MARK in tree:
            return [tree]
        return [s for v in tree.values() for s in _iterator_states(v)]
    if isinstance(tree, (list, tuple)):
        return [s for v in tree for s in _iterator_states(v)]
    return []


class TrainStream:
    """Endless training batches for one rank, plus the held-out batches and the unigram baseline.

    Iterate it (``next(stream)``) for dicts of int64 tensors ``[B, T]``: ``input_ids``, ``doc_ids`` and, by
    format, ``prompt_mask`` (bool) and ``answer_length`` ``[B]``. ``state_dict()`` / ``load_state_dict()``
    resume at exactly the next batch (the state also carries the current ``seq_len`` and rows per batch);
    ``set_seq_len(n)`` switches the row length at the current batch boundary, scaling the rows per batch so
    the tokens per batch stay the same.
    """

    def __init__(self, spec: StreamSpec, *, micro_batch_size: int, seq_len: int, num_workers: int,
                 eval_set: EvalSet, prefetch_factor: int = 2, worker_batches: int | None = None) -> None:
        if micro_batch_size < 1:
            raise ConfigError(f"the micro-batch size must be at least 1, got {micro_batch_size}")
        self.spec, self.eval_set = spec, eval_set
        self.micro_batch_size, self.seq_len = micro_batch_size, seq_len
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.bundle = bundle_size(worker_batches, num_workers, micro_batch_size * seq_len)
        self._loader = self._make_loader()
        self._iter: Any = None
        self._pending: dict[str, Any] | None = None
        # What is left of the current bundle, each batch with its worker's read head after it; the loader state
        # from before the bundle and the read head after the last batch served (for mid-bundle states).
        self._queue: list[tuple[dict[str, torch.Tensor], dict[str, Any] | None]] = []
        self._before: dict[str, Any] | None = None
        self._served: dict[str, Any] | None = None

    # -- iteration ------------------------------------------------------------------------------------------

    def _make_loader(self) -> StatefulDataLoader:
        dataset = BatchDataset(self.spec, self.micro_batch_size, self.seq_len, self.bundle)
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            # fork: workers inherit the opened source and tokenizer instead of re-importing everything.
            extra = {
                "prefetch_factor": self.prefetch_factor,
                "multiprocessing_context": "fork",
                "worker_init_fn": _ignore_stop_signals,
            }
        with warnings.catch_warnings():
            # torchdata 0.11 calls a torch API that torch 2.13 deprecates; nothing for a user to act on.
            warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")
            return StatefulDataLoader(dataset, batch_size=None, num_workers=self.num_workers, **extra)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._queue:
            self._next_bundle()
        batch, self._served = self._queue.pop(0)
        return batch

    def _next_bundle(self) -> None:
        if self._iter is None:
            if self._pending is not None:
                self._loader.load_state_dict(self._pending)
            self._iter = iter(self._loader)
            before, self._pending = self._pending, None
        else:
            before = None
        if self.bundle > 1:
            self._before = before if before is not None else self._loader.state_dict()
        try:
            item = next(self._iter)
        except UserError as exc:
            self.close()
            raise type(exc)(_one_line(exc)) from None
        if self.bundle == 1:
            self._queue = [(item, None)]
            return
        stacked, states = item["batches"], item["states"]
        self._queue = [({k: v[i] for k, v in stacked.items()}, state) for i, state in enumerate(states)]

    @property
    def tokens_per_batch(self) -> int:
        return self.micro_batch_size * self.seq_len

    def set_seq_len(self, seq_len: int) -> None:
        """Use rows of ``seq_len`` from the next batch on, with ``tokens_per_batch // seq_len`` rows per batch.

        Nothing is lost or repeated: the read heads continue mid-document at the token where they stopped.
        Worker processes restart from the current state; batches they had prefetched at the old length are
        discarded, and their tokens come again in rows of the new length.
        """
        if seq_len == self.seq_len:
            return
        if seq_len < 2 or self.tokens_per_batch % seq_len:
            raise ConfigError(
                f"cannot change seq_len from {self.seq_len} to {seq_len}: the {self.tokens_per_batch} tokens per "
                f"batch ({self.micro_batch_size} x {self.seq_len}) must split into whole rows; pick a seq_len that "
                f"divides {self.tokens_per_batch}"
            )
        state = self.state_dict()
        self.close()
        self.micro_batch_size, self.seq_len = self.tokens_per_batch // seq_len, seq_len
        self._loader = self._make_loader()
        self._pending = state["loader"]

    # -- state ------------------------------------------------------------------------------------------------

    def _layout(self) -> dict[str, int]:
        return {"seed": self.spec.seed, "rank": self.spec.rank, "world_size": self.spec.world_size,
                "num_workers": self.num_workers, "lanes": self.spec.lanes, "worker_batches": self.bundle}

    def _loader_state(self) -> dict[str, Any] | None:
        """The loader state as of the last batch served (see the module docstring for mid-bundle states)."""
        if self._iter is None:
            return self._pending
        if not self._queue:
            return self._loader.state_dict()
        assert self._before is not None and self._served is not None
        state = copy.deepcopy(self._before)
        heads = [h for h in _iterator_states(state) if h["consumer"] == self._served["consumer"]]
        if len(heads) != 1:
            raise DataError(f"the loader state holds {len(heads)} read heads of consumer "
                            f"{self._served['consumer']}, expected one")
        heads[0].clear()
        heads[0].update(copy.deepcopy(self._served))
        return state

    def state_dict(self) -> dict[str, Any]:
        """Where this rank's data stands after the last batch returned (plain ints, lists, dicts)."""
        return {"version": STATE_VERSION, "layout": self._layout(), "seq_len": self.seq_len,
                "micro_batch_size": self.micro_batch_size, "loader": self._loader_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batch is the one that followed when it was taken."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}; start a fresh run")
        if state["layout"] != self._layout():
            raise DataError(
                f"the data state was saved with {state['layout']} but this run has {self._layout()}; resume with "
                "the same run.seed, world size, data.num_workers, data.worker_batches and micro-batch size (any "
                "change reorders the data)"
            )
        self.close()
        self.micro_batch_size, self.seq_len = int(state["micro_batch_size"]), int(state["seq_len"])
        self._loader = self._make_loader()
        self._pending = state["loader"]

    def counters(self) -> dict[str, int]:
        """Documents used, blank documents skipped, too-long documents dropped or cut, summed over workers."""
        total: Counter[str] = Counter()
        for state in _iterator_states(self.state_dict()["loader"]):
            total.update(state["counters"])
        return {key: int(total.get(key, 0)) for key in ("docs", "empty_docs", "dropped_too_long", "cut_too_long")}

    def close(self) -> None:
        """Stop the worker processes (idempotent); iteration restarts them from the current state."""
        if self._iter is not None:
            if self._pending is None:
                try:
                    self._pending = self._loader_state()
                except Exception:  # workers already gone (an error is being raised): nothing to keep
                    self._pending = None
            self._queue, self._before, self._served = [], None, None
            shutdown = getattr(self._iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iter = None

    # -- evaluation -------------------------------------------------------------------------------------------

    @property
    def num_eval_rows(self) -> int:
        return self.eval_set.num_rows

    def eval_batches(self, batch_size: int) -> Any:
        """Held-out rows in order, once (the last batch may be smaller)."""
        return self.eval_set.eval_batches(batch_size)

    def unigram_cross_entropy(self, rows: int | None = None) -> float:
        return self.eval_set.unigram_cross_entropy(rows)

    def unigram_log_probs(self) -> np.ndarray:
        return self.eval_set.unigram_log_probs()


# -- building from the config -----------------------------------------------------------------------------------


def open_source(data: DataSection, tokenizer: TokenizerInfo) -> TextSource | ShardSet:
    """Open what ``data`` names, checking everything that can be checked without reading it all."""
    if data.source == "shards":
        return ShardSet.open(data.paths[0], tokenizer, data.max_docs)
    if data.source == "hub":
        assert data.hub_name is not None
        pieces = hub_pieces(HubDataset(data.hub_name, data.hub_config, data.hub_split, data.hub_revision))
    else:
        pieces = file_pieces(resolve_files(data.paths))
    sft = data_format(data.format).prompts
    layouts = sft_layouts(pieces) if sft else {}
    if data.max_docs is not None:
        pieces = limit_pieces(pieces, data.max_docs, lambda p: layouts[p.name][1] if sft else [data.text_column])
    return TextSource(
        pieces=tuple(pieces), tokenizer=tokenizer, eval_threshold=eval_threshold(data.eval_fraction),
        text_column=data.text_column, sft=sft, sft_template=data.sft_template, sft_layouts=layouts,
    )


def validate_data_source(data: DataSection, tokenizer: TokenizerInfo) -> None:
    """Fail now (before a run directory exists) on a missing file, a bad hub name or foreign shards."""
    open_source(data, tokenizer)


def _natural_units(source: TextSource | ShardSet, threshold: int) -> Any:
    if isinstance(source, TextSource):
        return source.natural_units(), source.encode
    limit = np.uint64(threshold)

    def units() -> Any:
        remaining = source.num_docs
        for shard in source.shards():
            held_out = np.asarray(shard.hashes[: min(shard.num_docs, remaining)]) < limit
            for i, flag in enumerate(held_out.tolist()):
                yield flag, shard.doc(i)
            remaining -= len(held_out)

    return units(), lambda docs: [Doc(tokens=d) for d in docs if d.size]


def build_pretrain_stream(
    data: DataSection,
    tokenizer: TokenizerInfo,
    *,
    seed: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
) -> TrainStream:
    """The training stream of rank ``rank`` of ``world_size`` for the ``data`` config section."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside the world size {world_size}")
    if micro_batch_size < 1:
        raise ConfigError(f"the micro-batch size must be at least 1, got {micro_batch_size}")
    workers = data.num_workers if num_workers is None else num_workers
    if workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {workers}")
    source = open_source(data, tokenizer)
    pad_id = tokenizer.eos_id if data.pad == "eos" else tokenizer.pad_id
    threshold = eval_threshold(data.eval_fraction)
    units, encode = _natural_units(source, threshold)
    eval_set = build_eval_set(
        units, encode, fmt=data.format, seq_len=data.seq_len, eos_id=tokenizer.eos_id, pad_id=pad_id,
        overflow=data.overflow, vocab_size=tokenizer.vocab_size, max_rows=data.max_eval_rows,
        eval_fraction=data.eval_fraction,
    )
    if workers > 0:
        # Each worker tokenizes on its own core; the Rust thread pool would only oversubscribe them (and it
        # warns after every fork once it has been used in the parent).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = StreamSpec(
        source=source, fmt=data.format, eos_id=tokenizer.eos_id, pad_id=pad_id, overflow=data.overflow, seed=seed,
        shuffle=data.shuffle, shuffle_buffer=data.shuffle_buffer, eval_threshold=threshold, rank=rank,
        world_size=world_size, lanes=micro_batch_size if data_format(data.format).packed else 1,
    )
    return TrainStream(spec, micro_batch_size=micro_batch_size, seq_len=data.seq_len, num_workers=workers,
                       eval_set=eval_set, worker_batches=data.worker_batches)


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGINT/SIGTERM to the training process: a Ctrl-C or a scheduler's SIGTERM reaches the
    whole process group, and a worker that died of it would fail the loader before the training loop could
    save its checkpoint. The loader still ends its workers on close, and they exit when the trainer dies."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)

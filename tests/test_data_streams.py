"""The training stream: sharding over ranks and workers, shuffling, bitwise resume, sequence-length changes,
the row formats (packed, rows, SFT) and failures that must surface as one clear line instead of a hang."""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from dlm.config import DataSection, dump_resolved, load_config, validate
from dlm.data_streams import build_pretrain_stream, is_eval_document, load_tokenizer, prepare_shards
from dlm.data_streams import stream as stream_module
from dlm.data_streams.documents import Doc
from dlm.data_streams.formats import DocFeed, ListStream, doc_rows_batch, sft_batch
from dlm.data_streams.shuffle import IndexPermutation, plan_pieces
from dlm.data_streams.stream import BatchDataset, BatchIterator, bundle_end, bundle_size
from dlm.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SFT_DIR = ROOT / "tests" / "data" / "sft"
EVAL_FRACTION = 0.2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2-mdm")


def _texts(count: int, offset: int = 0) -> list[str]:
    """Distinct short documents of varied length (5 to 40 words)."""
    return [
        f"Document {i} says " + " ".join(f"w{(i * 31 + j) % 997}" for j in range(5 + (i * 7) % 36)) + "."
        for i in range(offset, offset + count)
    ]


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two JSON Lines files (fewer files than most rank x worker layouts below) of 60 documents."""
    directory = tmp_path_factory.mktemp("corpus")
    texts = _texts(60)
    _write_jsonl(directory / "a.jsonl", texts[:25])
    _write_jsonl(directory / "b.jsonl", texts[25:])
    return directory, texts


@pytest.fixture(scope="module")
def shards(corpus: tuple[Path, list[str]], tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    prepare_shards(str(corpus[0]), out, tokenizer, shard_tokens=300, show_progress=False)
    return out


def _section(corpus_dir: Path, shards_dir: Path | None = None, **fields: object) -> DataSection:
    source = {"source": "shards", "paths": [str(shards_dir)]} if shards_dir else {"paths": [str(corpus_dir)]}
    base = {"seq_len": 32, "eval_fraction": EVAL_FRACTION, "shuffle_buffer": 4, **source}
    return DataSection.model_validate({**base, **fields})


def _train_keys(tokenizer, texts: list[str]) -> set[tuple[int, ...]]:
    return {
        tuple(tokenizer.tokenizer(t, add_special_tokens=False)["input_ids"])
        for t in texts
        if not is_eval_document(t, EVAL_FRACTION)
    }


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def _checkpointed(state: dict) -> dict:
    """A state as a checkpoint would hold it: through torch.save / torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- shuffling primitives --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 1000, 4097])
def test_index_permutation_is_a_keyed_bijection(n: int) -> None:
    perm = IndexPermutation(n, key=123)
    image = perm(np.arange(n))
    assert sorted(image.tolist()) == list(range(n))
    assert np.array_equal(image, IndexPermutation(n, key=123)(np.arange(n)))
    if n >= 17:
        assert not np.array_equal(image, np.arange(n))
        assert not np.array_equal(image, IndexPermutation(n, 124)(np.arange(n)))


@pytest.mark.parametrize("pieces,consumers", [(1, 6), (2, 6), (4, 6), (10, 4), (3, 3), (6, 2), (5, 1)])
def test_piece_plans_cover_every_row_once(pieces: int, consumers: int) -> None:
    rows = {p: [(p, r) for r in range(5 + p)] for p in range(pieces)}
    order = np.random.default_rng(0).permutation(pieces)
    taken: list[tuple[int, int]] = []
    for c in range(consumers):
        plan = plan_pieces(pieces, consumers, c, order)
        group_rows = [row for p in plan.pieces for row in rows[p]]
        taken += group_rows[plan.offset :: plan.stride]
    assert sorted(taken) == sorted(r for rs in rows.values() for r in rs)


# --- sharding over (rank, worker) -------------------------------------------------------------------------------


def _consumer_epoch(spec, workers: int, worker: int, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Epoch 0 of the documents one (rank, worker) reads, through the real BatchDataset entry point."""
    info = SimpleNamespace(num_workers=workers, id=worker) if workers else None
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: info)
    iterator = BatchDataset(spec, 1, 32).batch_iterator()
    docs = []
    for doc, cursor, _ in iterator.stream.iterate(iterator.stream.start()):
        if cursor["epoch"] > 0:
            break
        docs.append(tuple(doc.tokens.tolist()))
    return docs


@pytest.mark.parametrize("use_shards", [False, True], ids=["text", "shards"])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_document_goes_to_exactly_one_rank_and_worker(
    corpus, shards, tokenizer, world: int, workers: int, use_shards: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, texts = corpus
    section = _section(directory, shards if use_shards else None)
    seen: list[tuple[int, ...]] = []
    for rank in range(world):
        stream = build_pretrain_stream(section, tokenizer, seed=5, micro_batch_size=1, rank=rank, world_size=world)
        for worker in range(max(1, workers)):
            seen += _consumer_epoch(stream.spec, workers, worker, monkeypatch)
    assert len(seen) == len(set(seen)), "a document went to two consumers"
    assert set(seen) == _train_keys(tokenizer, texts)


def _workers_of(batches: int, workers: int, bundle: int) -> list[int]:
    """Which worker hands over each batch: bundles in turn, each up to its worker's next ``bundle_end``."""
    made, order = [0] * workers, []
    while len(order) < batches:
        w = (order[-1] + 1) % workers if order else 0
        end = bundle_end(made[w], bundle)
        order += [w] * (end - made[w])
        made[w] = end
    return order[:batches]


def test_bundles_start_small_then_hold_their_size() -> None:
    assert [bundle_end(c, 8) for c in (0, 1, 2, 3, 4, 7, 8, 9, 15, 16)] == [1, 2, 4, 4, 8, 8, 16, 16, 16, 24]
    assert [bundle_end(c, 5) for c in (0, 1, 2, 4, 5, 9)] == [1, 2, 4, 5, 10, 10]
    assert [bundle_end(c, 1) for c in (0, 1, 5)] == [1, 2, 6]
    assert _workers_of(12, 2, 4) == [0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("bundle", [1, 3])
def test_real_loader_interleaves_the_workers_consumers(corpus, tokenizer, bundle: int) -> None:
    """Rank 1 of 2 with 2 worker processes handing over bundles: batch i comes from consumer 2 + the worker
    whose bundle holds it, exactly as simulated."""
    section = _section(corpus[0], num_workers=2, worker_batches=bundle)
    stream = build_pretrain_stream(section, tokenizer, seed=9, micro_batch_size=2, rank=1, world_size=2)
    got = [next(stream) for _ in range(14)]
    stream.close()
    simulated = [BatchIterator(stream.spec, c, 4, 2, 32) for c in (2, 3)]
    expected = [next(simulated[w]) for w in _workers_of(14, 2, bundle)]
    assert _same(got, expected)


def test_worker_bundles_default_to_a_share_of_the_handoff_cost() -> None:
    assert bundle_size(None, 0, 4096) == 1 and bundle_size(7, 0, 4096) == 1, "no hand-off in-process"
    assert bundle_size(None, 2, 8 * 1024) == 32 and bundle_size(None, 2, 64) == 64 and bundle_size(None, 2, 1 << 20) == 1
    assert bundle_size(5, 2, 64) == 5


def test_shuffling_depends_on_seed_and_epoch(corpus, tokenizer) -> None:
    section = _section(corpus[0], format="rows", seq_len=128)
    train = len(_train_keys(tokenizer, corpus[1]))

    def epochs(seed: int) -> list[list[tuple[int, ...]]]:
        stream = build_pretrain_stream(section, tokenizer, seed=seed, micro_batch_size=train)
        return [[tuple(r) for r in next(stream)["input_ids"].tolist()] for _ in range(2)]

    first, again, other = epochs(1), epochs(1), epochs(2)
    assert first == again
    assert first[0] != first[1] and sorted(first[0]) == sorted(first[1]), "each epoch: same documents, new order"
    assert first[0] != other[0]
    unshuffled = build_pretrain_stream(_section(corpus[0], format="rows", seq_len=128, shuffle=False), tokenizer,
                                       seed=1, micro_batch_size=train)
    rows = next(unshuffled)
    lengths = rows["answer_length"].tolist()
    decoded = [tokenizer.tokenizer.decode(r[:n]) for r, n in zip(rows["input_ids"].tolist(), lengths)]
    assert decoded == [t for t in corpus[1] if not is_eval_document(t, EVAL_FRACTION)]


# --- exact resume ------------------------------------------------------------------------------------------------


def _resume_check(section: DataSection, tokenizer, ks: tuple[int, ...], total: int, batch: int = 3) -> None:
    build = lambda: build_pretrain_stream(section, tokenizer, seed=11, micro_batch_size=batch)  # noqa: E731
    straight_stream = build()
    straight = [next(straight_stream) for _ in range(total)]
    straight_stream.close()
    run, states = build(), {}
    for step in range(1, max(ks) + 1):
        next(run)
        if step in ks:
            states[step] = _checkpointed(copy.deepcopy(run.state_dict()))
    run.close()
    for k in ks:
        resumed = build()
        resumed.load_state_dict(states[k])
        got = [next(resumed) for _ in range(total - k)]
        resumed.close()
        assert _same(got, straight[k:]), f"resume at batch {k} differs"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("workers", "bundle"), [(0, None), (2, 5), (2, None)])
def test_resume_is_bitwise_exact_text_shuffled(corpus, tokenizer, workers: int, bundle: int | None) -> None:
    # 48 docs x ~25 tokens / (3 x 32 tokens per batch): an epoch is ~13 batches per consumer, blocks of 4 docs.
    # Bundles of 5 put every k in the middle of a worker's hand-off; the default (64 here) never ends one.
    section = _section(corpus[0], num_workers=workers, worker_batches=bundle)
    _resume_check(section, tokenizer, ks=(1, 6, 17, 29), total=36)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bitwise_exact_shards(corpus, shards, tokenizer, workers: int) -> None:
    section = _section(corpus[0], shards, num_workers=workers, worker_batches=4 if workers else None)
    _resume_check(section, tokenizer, ks=(2, 13, 27), total=34)


@pytest.mark.parametrize("fmt", ["rows", "sft"])
def test_resume_is_bitwise_exact_rows_and_sft(corpus, tokenizer, fmt: str) -> None:
    if fmt == "sft":
        section = DataSection(paths=[str(SFT_DIR / "gsm8k_train_24.jsonl")], format="sft", seq_len=256,
                              eval_fraction=0.2, shuffle_buffer=5, overflow="cut")
    else:
        section = _section(corpus[0], format="rows", seq_len=24, overflow="cut")
    _resume_check(section, tokenizer, ks=(3, 9), total=16)


def test_resume_refuses_another_layout(corpus, tokenizer) -> None:
    one = build_pretrain_stream(_section(corpus[0]), tokenizer, seed=0, micro_batch_size=2)
    next(one)
    state = one.state_dict()
    layouts = ({"seed": 1}, {"seed": 0, "num_workers": 1}, {"seed": 0, "rank": 1, "world_size": 2},
               {"seed": 0, "micro_batch_size": 4})
    for kwargs in layouts:
        other = build_pretrain_stream(_section(corpus[0]), tokenizer, **{"micro_batch_size": 2, **kwargs})
        with pytest.raises(DataError, match="resume with the same run.seed, world size, data.num_workers, data.wor"):
            other.load_state_dict(state)
    workers = build_pretrain_stream(_section(corpus[0], num_workers=2, worker_batches=3), tokenizer, seed=0,
                                    micro_batch_size=2)
    next(workers)
    state = workers.state_dict()
    workers.close()
    for bundle in (None, 4):
        other = build_pretrain_stream(_section(corpus[0], num_workers=2, worker_batches=bundle), tokenizer, seed=0,
                                      micro_batch_size=2)
        with pytest.raises(DataError, match="'worker_batches': 3} but this run has .*'worker_batches': (64|4)}"):
            other.load_state_dict(state)


# --- sequence-length changes -------------------------------------------------------------------------------------


def _lane_documents(batches: list[dict[str, torch.Tensor]], lanes: int, eos: int, consumers: int = 1,
                    bundle: int = 1) -> list[tuple[list[tuple[int, ...]], list[tuple[int, ...]]]]:
    """Per consumer, the documents its packed rows spell out lane by lane (row j of a consumer belongs to lane
    j % lanes; the loader takes bundles of batches from the consumers in turn): (complete ones, unfinished
    tails)."""
    streams = [[[] for _ in range(lanes)] for _ in range(consumers)]
    made = [0] * consumers
    for batch, c in zip(batches, _workers_of(len(batches), consumers, bundle)):
        for row in batch["input_ids"].tolist():
            streams[c][made[c] % lanes].extend(row)
            made[c] += 1
    out = []
    for lanes_of_c in streams:
        complete, tails = [], []
        for tokens in lanes_of_c:
            current: list[int] = []
            for t in tokens:
                if t == eos:
                    complete.append(tuple(current))
                    current = []
                else:
                    current.append(t)
            if current:
                tails.append(tuple(current))
        out.append((complete, tails))
    return out


def _check_no_loss_no_repeat(stream, batches, tokenizer, consumers: int) -> None:
    """Every document a consumer started is its stream's next document: complete ones exactly once, the
    rest as the unfinished tail of one lane; nothing skipped, nothing twice."""
    lanes = _lane_documents(batches, stream.spec.lanes, tokenizer.eos_id, consumers, stream.bundle)
    for c, (complete, tails) in enumerate(lanes):
        docs = stream.spec.doc_stream(c, consumers).iterate(stream.spec.doc_stream(c, consumers).start())
        expected = [tuple(next(docs)[0].tokens.tolist()) for _ in range(len(complete) + len(tails) + 2)]
        started = expected[: len(complete) + len(tails)]
        remaining = list(started)
        for doc in complete:
            remaining.remove(doc)  # ValueError if a document appears that was not due, or twice
        assert len(remaining) == len(tails)
        for tail in tails:
            match = next(d for d in remaining if d[: len(tail)] == tail)
            remaining.remove(match)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_seq_len_change_keeps_every_token(corpus, tokenizer, workers: int) -> None:
    # With 2 workers in bundles of 4, the changes (after 5, 11 and 18 batches) fall inside a worker's bundle.
    section = _section(corpus[0], num_workers=workers, worker_batches=4 if workers else None)
    stream = build_pretrain_stream(section, tokenizer, seed=4, micro_batch_size=4)
    got, shapes = [], []
    for seq_len, steps in ((32, 5), (64, 6), (16, 7), (128, 6)):
        stream.set_seq_len(seq_len)
        if seq_len == 128:
            state = _checkpointed(stream.state_dict())
        for _ in range(steps):
            batch = next(stream)
            shapes.append(tuple(batch["input_ids"].shape))
            ids, doc_ids = batch["input_ids"], batch["doc_ids"]
            assert torch.equal(doc_ids[:, 1:] - doc_ids[:, :-1], (ids[:, :-1] == tokenizer.eos_id).long())
            got.append(batch)
    stream.close()
    assert sorted(set(shapes)) == [(1, 128), (2, 64), (4, 32), (8, 16)]
    _check_no_loss_no_repeat(stream, got, tokenizer, consumers=max(1, workers))

    # A state taken right after a change resumes at the new length, bit for bit.
    resumed = build_pretrain_stream(section, tokenizer, seed=4, micro_batch_size=4)
    resumed.load_state_dict(state)
    tail = [next(resumed) for _ in range(6)]
    resumed.close()
    assert resumed.seq_len == 128 and _same(tail, got[-6:])


def test_packed_rows_of_a_batch_come_from_different_documents(corpus, tokenizer) -> None:
    """Lanes: with rows shorter than a document, consecutive rows of one packer would repeat its document."""
    texts = [" ".join(f"d{i}w{j}" for j in range(200)) for i in range(40)]  # ~600 tokens each
    path = _write_jsonl(corpus[0].parent / "long_docs.jsonl", texts)
    stream = build_pretrain_stream(DataSection(paths=[str(path)], seq_len=32, eval_fraction=0.2), tokenizer,
                                   seed=0, micro_batch_size=8)
    for _ in range(3):
        batch = next(stream)
        words = [tokenizer.tokenizer.decode(row[:8]).split()[1] for row in batch["input_ids"].tolist()]
        documents = {w.split("w")[0] for w in words}
        assert len(documents) == 8, words


def test_seq_len_change_must_keep_whole_rows(corpus, tokenizer) -> None:
    stream = build_pretrain_stream(_section(corpus[0]), tokenizer, seed=0, micro_batch_size=3)
    with pytest.raises(ConfigError, match=r"cannot change seq_len from 32 to 64: the 96 tokens per batch"):
        stream.set_seq_len(64)


# --- formats --------------------------------------------------------------------------------------------------------


def _feed(docs: list[Doc]) -> DocFeed:
    return DocFeed(ListStream(docs), {"epoch": 0, "pos": 0})


def test_rows_layout_pad_and_overflow() -> None:
    docs = [Doc(np.array([5, 6])), Doc(np.arange(10, 17)), Doc(np.array([8])), Doc(np.arange(20, 25))]
    feed = _feed(docs)
    batch = doc_rows_batch(feed, 3, 6, eos_id=1, pad_id=0, overflow="drop")
    assert batch["input_ids"].tolist() == [[5, 6, 1, 0, 0, 0], [8, 1, 0, 0, 0, 0], [20, 21, 22, 23, 24, 1]]
    assert batch["answer_length"].tolist() == [2, 1, 5] and not batch["doc_ids"].any()
    assert feed.counters == {"docs": 4, "dropped_too_long": 1, "empty_docs": 0}
    feed = _feed(docs)
    batch = doc_rows_batch(feed, 2, 6, eos_id=1, pad_id=1, overflow="cut")
    assert batch["input_ids"].tolist() == [[5, 6, 1, 1, 1, 1], [10, 11, 12, 13, 14, 15]]
    assert batch["answer_length"].tolist() == [2, 7] and feed.counters["cut_too_long"] == 1


def test_sft_layout_prompt_mask_and_answer_length() -> None:
    docs = [Doc(np.array([7, 8]), prompt=np.array([3, 4, 5])), Doc(np.arange(20, 30), prompt=np.array([3])),
            Doc(np.array([9]), prompt=np.arange(40, 48)), Doc(np.array([6]), prompt=np.array([2]))]
    feed = _feed(docs)
    batch = sft_batch(feed, 2, 8, eos_id=1, pad_id=0, overflow="drop")
    assert batch["input_ids"].tolist() == [[3, 4, 5, 7, 8, 1, 0, 0], [2, 6, 1, 0, 0, 0, 0, 0]]
    assert batch["prompt_mask"].tolist() == [[True] * 3 + [False] * 5, [True] + [False] * 7]
    assert batch["answer_length"].tolist() == [2, 1]
    assert feed.counters["dropped_too_long"] == 2
    feed = _feed(docs)
    batch = sft_batch(feed, 3, 8, eos_id=1, pad_id=0, overflow="cut")
    assert batch["input_ids"][1].tolist() == [3, 20, 21, 22, 23, 24, 25, 26]  # answer cut, no EOS
    assert batch["answer_length"].tolist() == [2, 10, 1], "the true answer length, not the cut one"
    # The prompt of 8 tokens never fits, not even cut.
    assert feed.counters == {"docs": 4, "cut_too_long": 1, "dropped_too_long": 1, "empty_docs": 0}


@pytest.mark.parametrize("name,layout", [("alpaca_en_demo_24.json", "alpaca"), ("gsm8k_train_24.jsonl", "qa")])
def test_sft_rows_from_alpaca_and_gsm8k(tokenizer, name: str, layout: str) -> None:
    path = SFT_DIR / name
    records = json.loads(path.read_text()) if name.endswith(".json") else [
        json.loads(line) for line in path.read_text().splitlines()
    ]
    expected = {}
    for r in records:
        parts = [r["instruction"], r["input"]] if layout == "alpaca" else [r["question"]]
        prompt = "\n\n".join(p for p in parts if p)
        expected[prompt + "\n\n"] = r["output"] if layout == "alpaca" else r["answer"]
    encode = lambda text: tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    section = DataSection(paths=[str(path)], format="sft", seq_len=1024, eval_fraction=0.3, overflow="cut")
    stream = build_pretrain_stream(section, tokenizer, seed=0, micro_batch_size=4)
    assert "prompt_mask" in stream.eval_set.rows
    for _ in range(3):
        batch = next(stream)
        assert set(batch) == {"input_ids", "doc_ids", "prompt_mask", "answer_length"}
        assert batch["prompt_mask"].dtype == torch.bool and batch["answer_length"].dtype == torch.int64
        for ids, mask, length in zip(batch["input_ids"].tolist(), batch["prompt_mask"].tolist(),
                                     batch["answer_length"].tolist()):
            p = sum(mask)
            assert mask == [True] * p + [False] * (1024 - p)
            prompt = tokenizer.tokenizer.decode(ids[:p])
            assert prompt in expected
            assert ids[:p] == encode(prompt) and ids[p : p + length] == encode(expected[prompt])
            assert ids[p + length :] == [tokenizer.eos_id] * (1024 - p - length)


def test_sft_chat_template_masks_the_rendered_prompt(tokenizer, tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    shutil.copytree(ROOT / "dlm" / "assets" / "tokenizers" / "gpt2-mdm", tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    chat = load_tokenizer(str(tok_dir))
    data = tmp_path / "chat.jsonl"
    conversations = [[{"role": "system", "content": f"Be brief {i}."}, {"role": "user", "content": f"Count to {i}."},
                      {"role": "assistant", "content": " ".join(str(j) for j in range(1, i + 2))}] for i in range(30)]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    section = DataSection(paths=[str(data)], format="sft", sft_template="chat", seq_len=64, eval_fraction=0.3)
    batch = next(build_pretrain_stream(section, chat, seed=0, micro_batch_size=4))
    for ids, mask, length in zip(batch["input_ids"].tolist(), batch["prompt_mask"].tolist(),
                                 batch["answer_length"].tolist()):
        p = sum(mask)
        prompt, answer = chat.tokenizer.decode(ids[:p]), chat.tokenizer.decode(ids[p : p + length])
        assert prompt.startswith("<|system|>\nBe brief") and prompt.endswith("<|assistant|>\n")
        i = int(prompt.split("Count to ")[1].split(".")[0])
        assert answer == " ".join(str(j) for j in range(1, i + 2)) + "<|endoftext|>"
    with pytest.raises(DataError, match="has no chat template; set data.sft_template=plain"):
        build_pretrain_stream(section, tokenizer, seed=0, micro_batch_size=4)


# --- failures: clear errors, never a hang --------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_no_document_fits_a_row_is_an_error_not_a_hang(tmp_path: Path, tokenizer) -> None:
    # Rows alternate short / long training documents, so consumer 1 of 2 only ever sees documents too long
    # for a row of 8 tokens: dropping them all, epoch after epoch, must fail instead of spinning.
    train = lambda texts: [t for t in texts if not is_eval_document(t, 0.2)][:12]  # noqa: E731
    short = train(f"tiny {i}." for i in range(100))
    long = train(" ".join(f"word{i}x{j}" for j in range(12)) for i in range(100))
    held_out = [t for t in (f"small {i}." for i in range(100)) if is_eval_document(t, 0.2)][:4]
    path = _write_jsonl(tmp_path / "docs.jsonl", [t for pair in zip(short, long) for t in pair] + held_out)
    section = DataSection(paths=[str(path)], format="rows", seq_len=8, eval_fraction=0.2, shuffle_buffer=4)
    fine = build_pretrain_stream(section, tokenizer, seed=0, micro_batch_size=2, rank=0, world_size=2)
    assert next(fine)["answer_length"].max() < 8
    starved = build_pretrain_stream(section, tokenizer, seed=0, micro_batch_size=2, rank=1, world_size=2)
    with pytest.raises(DataError, match=r"no document in a whole epoch fits data.seq_len=8 .* data.overflow=cut"):
        next(starved)


def test_a_consumer_without_documents_is_an_error(tmp_path: Path, tokenizer) -> None:
    path = _write_jsonl(tmp_path / "one.jsonl", _texts(4))
    section = DataSection(paths=[str(path)], seq_len=8, eval_fraction=0.5, max_eval_rows=1)
    stream = build_pretrain_stream(section, tokenizer, seed=0, micro_batch_size=1, rank=5, world_size=6)
    with pytest.raises(DataError, match=r"data consumer 5 of 6 \(rank x worker\) got no training document"):
        next(stream)


@pytest.mark.timeout(120)
def test_a_worker_error_is_one_line_naming_the_file(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dlm.data_streams.eval_set.UNIGRAM_SAMPLE_TOKENS", 50)
    # The eval scan in this process stops inside a.jsonl; the worker that reads b.jsonl meets the damage.
    _write_jsonl(tmp_path / "a.jsonl", _texts(200))
    bad = tmp_path / "b.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(30, 200)) + '{"text": broken\n')
    section = DataSection(paths=[str(tmp_path / "*.jsonl")], seq_len=16, eval_fraction=0.3, max_eval_rows=1,
                          num_workers=2, shuffle=False)
    stream = build_pretrain_stream(section, tokenizer, seed=0, micro_batch_size=1)
    with pytest.raises(DataError) as caught:
        for _ in range(200):
            next(stream)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot read {bad} as json")


# --- config ----------------------------------------------------------------------------------------------------------


def test_fineweb_config_validates_without_reading_data(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "fineweb-10bt.yaml")
    assert (cfg.data.source, cfg.data.hub_name, cfg.data.hub_config) == ("hub", "HuggingFaceFW/fineweb", "sample-10BT")
    assert cfg.data.format == "pretrain-packed" and cfg.data.num_workers >= 1
    resolved = yaml.safe_load(dump_resolved(cfg, tmp_path).read_text())
    assert validate(resolved).data == cfg.data, "the resolved config written to a run dir validates again"
    smoke = load_config(ROOT / "configs" / "smoke.yaml")
    assert (smoke.data.source, smoke.data.format) == ("files", "pretrain-packed")


@pytest.mark.parametrize("data,message", [
    ({"source": "hub"}, "data.hub_name = None: is required with data.source=hub"),
    ({"source": "hub", "hub_name": "a/b", "paths": ["x"]}, "data.paths = ['x']: is not used with data.source=hub"),
    ({"hub_name": "a/b"}, "data.hub_name = 'a/b': applies only to data.source=hub"),
    ({"source": "shards", "paths": ["a", "b"]}, "must name exactly one directory"),
    ({"source": "shards", "paths": ["a"], "format": "sft"}, "read SFT data with source=files"),
    ({"sft_template": "chat"}, "data.sft_template = 'chat': applies only to data.format=sft"),
])
def test_data_section_rejects_impossible_combinations(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate({"data": data})


def test_sft_files_of_different_layouts_mix_in_one_source(tokenizer) -> None:
    """alpaca .json and question/answer .jsonl in one data.paths: each file read with its own layout."""
    paths = [str(SFT_DIR / "alpaca_en_demo_24.json"), str(SFT_DIR / "gsm8k_train_24.jsonl")]
    section = DataSection(paths=paths, format="sft", seq_len=1024, eval_fraction=0.1, overflow="cut",
                          shuffle_buffer=4)
    stream = build_pretrain_stream(section, tokenizer, seed=0, micro_batch_size=8)
    prompts = []
    for _ in range(5):
        batch = next(stream)
        for ids, mask in zip(batch["input_ids"].tolist(), batch["prompt_mask"].tolist()):
            prompts.append(tokenizer.tokenizer.decode(ids[: sum(mask)]))
    stream.close()
    gsm8k = [json.loads(line)["question"] for line in (SFT_DIR / "gsm8k_train_24.jsonl").read_text().splitlines()]
    alpaca = [r["instruction"] for r in json.loads((SFT_DIR / "alpaca_en_demo_24.json").read_text())]
    assert any(p.startswith(tuple(gsm8k)) for p in prompts)
    assert any(p.startswith(tuple(alpaca)) for p in prompts)

"""A word-level tokenizer trained on a small closed-vocabulary corpus (the synthetic length task).

Why: on a CPU the LM head over GPT-2's 50k vocabulary costs about 80 % of a tiny model's training step, so a
task whose whole vocabulary is a few hundred words trains an order of magnitude faster with a tokenizer of
its own. It is built with the ``tokenizers`` library (WordLevel model, whitespace/punctuation split, its
WordLevelTrainer) and saved as a ``transformers`` fast tokenizer directory, so every dlm command loads it
through the same ``tokenizer.name_or_path`` as any other local tokenizer. Each answer item of the synthetic
task is one word, hence one token, and decoding joins tokens with single spaces, which is exactly the
answer format the task's checker compares against.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from dlm.errors import DataError

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
UNK_TOKEN = "<|unk|>"


def iter_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Every string value of every record of JSON Lines / JSON list files, and every line of text files."""
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such file; give the JSON Lines, JSON or text files to train on")
        if path.suffix == ".txt":
            yield from path.read_text(encoding="utf-8").splitlines()
            continue
        text = path.read_text(encoding="utf-8")
        records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
        for record in records:
            if isinstance(record, dict):
                yield from (value for value in record.values() if isinstance(value, str))
            elif isinstance(record, str):
                yield record


def train_word_tokenizer(texts: Iterable[str], out_dir: str | Path, *, min_frequency: int = 1) -> int:
    """Train a word-level tokenizer on ``texts`` and save it to ``out_dir``; returns its vocabulary size.

    The vocabulary holds every word and punctuation run seen at least ``min_frequency`` times plus EOS, the
    mask token and an unknown token. EOS also pads (LLaDA's SFT convention), so the special ids are
    ``unk = 0, eos = 1, mask = 2``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(
        special_tokens=[UNK_TOKEN, EOS_TOKEN, MASK_TOKEN], min_frequency=min_frequency, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() <= 3:
        raise DataError("the corpus has no words to build a vocabulary from; give files with text in them")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=UNK_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN, clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return int(tokenizer.get_vocab_size())

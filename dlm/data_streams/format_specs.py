"""The registry of row formats and what each can do, so code asks a format's capabilities instead of
comparing its name.

A new format is a batch builder in :mod:`dlm.data_streams.formats` (``builder(feed, rows, seq_len, eos_id,
pad_id, overflow)``) and one entry here. This module imports nothing heavy: the config section validates
``data.format`` against it before any data library is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlm.errors import ConfigError


@dataclass(frozen=True)
class DataFormat:
    """One row format and the capabilities the objective, the curriculum and the data stream read."""

    name: str
    builder: str
    """Name of the batch builder in :mod:`dlm.data_streams.formats`."""
    packed: bool
    """Documents run on across rows (EOS between them, no padding): rows come from ``lanes`` packers, and a
    held-out set is measured in tokens, not rows."""
    prompts: bool
    """Rows hold a prompt (``prompt_mask``) that is context, never masked: SFT data, read from files only."""
    answer_lengths: bool
    """Rows carry ``answer_length`` and EOS padding: the length head, generation-sized canvases and
    pad-share annealing need them."""


FORMATS: dict[str, DataFormat] = {
    "pretrain-packed": DataFormat("pretrain-packed", "packed_batch", packed=True, prompts=False, answer_lengths=False),
    "rows": DataFormat("rows", "doc_rows_batch", packed=False, prompts=False, answer_lengths=True),
    "sft": DataFormat("sft", "sft_batch", packed=False, prompts=True, answer_lengths=True),
}

ANSWER_LENGTH_FORMATS = " or ".join(name for name, spec in FORMATS.items() if spec.answer_lengths)
"""For messages: the formats whose rows carry answer lengths ("rows or sft")."""


def data_format(name: str) -> DataFormat:
    """The registered format ``name``; an unknown one is a config error naming the allowed ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"config error: data.format = {name!r}: allowed: {', '.join(FORMATS)}") from None

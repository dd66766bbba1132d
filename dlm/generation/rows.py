"""Rows of ``[prompt, canvas]`` for the sampler: left padding, masks and the model call.

Prompts of different lengths share a batch by left padding: every canvas then starts at the same column, so
one slice picks the canvas of every row. Padding must not change what a row computes, so a padded batch gives
the model ``doc_ids`` (pad = document 0, the row's real tokens = document 1: real tokens never attend to pads)
and ``position_ids`` that start at 0 on the first real token. A batch without padding passes neither, which
is exactly the call a plain full-canvas sampler makes (the parity test relies on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Denoiser(Protocol):
    """What the sampler needs of a model: hidden states from token ids, logits from hidden states.

    :class:`~dlm.modeling.DiffusionTransformer` is one; tests pass scripted fakes.
    """

    def __call__(self, input_ids: Tensor, doc_ids: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        ...

    def logits(self, hidden: Tensor) -> Tensor:
        ...


@dataclass(frozen=True)
class RowBatch:
    """A left-padded batch of ``[pad …, prompt, canvas]`` rows; the canvas starts at column ``prompt_width``."""

    input_ids: Tensor
    doc_ids: Tensor | None
    position_ids: Tensor | None
    prompt_mask: Tensor
    prompt_width: int

    @property
    def width(self) -> int:
        """Columns per row: the padded prompt plus the canvas."""
        return int(self.input_ids.shape[1])


def model_device(model: object) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model that has neither)."""
    for getter in ("parameters", "buffers"):
        tensors = getattr(model, getter, None)
        if tensors is not None:
            first = next(iter(tensors()), None)
            if first is not None:
                return first.device
    return torch.device("cpu")


def pack_rows(prompts: Sequence[Tensor], canvases: Sequence[Tensor], pad_id: int) -> RowBatch:
    """Left-pad ``prompts`` (1-D long tensors) to a common width and append the canvases (all one length)."""
    if len(prompts) != len(canvases) or not prompts:
        raise ValueError(f"need one canvas per prompt and at least one row, got {len(prompts)} and {len(canvases)}")
    lengths = [int(p.numel()) for p in prompts]
    width = max(lengths)
    canvas = torch.stack(list(canvases))
    device = canvas.device
    rows = len(prompts)
    prompt_block = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros((rows, width + canvas.shape[1]), dtype=torch.bool, device=device)
    for r, (p, n) in enumerate(zip(prompts, lengths)):
        if n:
            prompt_block[r, width - n :] = p
            prompt_mask[r, width - n : width] = True
    input_ids = torch.cat([prompt_block, canvas], dim=1)
    if all(n == width for n in lengths):
        return RowBatch(input_ids, None, None, prompt_mask, width)
    starts = torch.tensor([width - n for n in lengths], device=device)[:, None]
    cols = torch.arange(input_ids.shape[1], device=device)[None, :]
    real = cols >= starts
    doc_ids = real.to(torch.long)
    position_ids = (cols - starts).clamp(min=0)
    return RowBatch(input_ids, doc_ids, position_ids, prompt_mask, width)


def run_model(model: Denoiser, rows: RowBatch, input_ids: Tensor | None = None, repeat: int = 1) -> Tensor:
    """Hidden states ``[repeat·B, T, d]`` of ``input_ids`` (default ``rows.input_ids``) with ``rows``' masks.

    ``repeat`` tiles the masks for an input that stacks several variants of the rows (classifier-free
    guidance runs the conditional and unconditional rows in one call).
    """
    ids = rows.input_ids if input_ids is None else input_ids
    doc_ids = None if rows.doc_ids is None else rows.doc_ids.repeat(repeat, 1)
    position_ids = None if rows.position_ids is None else rows.position_ids.repeat(repeat, 1)
    return model(ids, doc_ids=doc_ids, position_ids=position_ids)


def canvas_logits(model: Denoiser, rows: RowBatch, *, cfg_scale: float, mask_id: int, shift: bool = False) -> Tensor:
    """Logits ``[B, C, V]`` of the canvas positions, with unsupervised classifier-free guidance when
    ``cfg_scale > 0``.

    Guidance follows LLaDA: the unconditional rows are the rows with every prompt token replaced by the mask
    token, both variants go through the model in one batch (conditional first), and the logits combine as
    ``uncond + (cfg_scale + 1) · (cond - uncond)``. The LM head runs on the canvas only; prompt positions
    never need logits. A model trained with ``objective.shift`` (AR adaptation) predicts position ``i`` from the
    hidden state at ``i - 1``, so its canvas logits are read one position earlier.
    """
    start = rows.prompt_width
    if shift and start < 1:
        raise ValueError("a shift model needs at least one prompt token before the canvas")
    lo, hi = (start - 1, rows.width - 1) if shift else (start, rows.width)
    if cfg_scale > 0:
        unconditional = rows.input_ids.masked_fill(rows.prompt_mask, mask_id)
        hidden = run_model(model, rows, torch.cat([rows.input_ids, unconditional], dim=0), repeat=2)
        logits, un_logits = torch.chunk(model.logits(hidden[:, lo:hi]), 2, dim=0)
        return un_logits + (cfg_scale + 1) * (logits - un_logits)
    return model.logits(run_model(model, rows)[:, lo:hi])

"""Curriculum over sequence length and pad-share annealing, both pure functions of the optimizer step.

Short rows early make the first steps cheaper (attention and activation memory grow with length) and, with
tokens per step held constant, give more, smaller documents per batch while the model is learning local
statistics; the length then grows to ``data.seq_len``. Because the schedule depends on the step alone, a
resumed run needs no saved schedule state to land on the same length; the checkpoint still records the
values the loop used (:meth:`Curriculum.state`) so a resume can check them and a reader can see them.

Pad-share annealing is the seed project's ``pad_masked_perc``: in ``[text, EOS, pad …]`` and SFT rows most
tokens of a short document's row are EOS padding, and early in training predicting them is a trivial task
that drowns the rest of the loss. The share of padding that may be masked rises linearly from 0 to 1.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from dlm.config import RunConfig
from dlm.training.config import curriculum_lengths


@dataclass(frozen=True)
class Curriculum:
    """Row length and maskable pad share at each optimizer step (1-based) of one run."""

    kind: str
    max_len: int
    start_len: int
    steps: int
    stages: tuple[tuple[int, int], ...]
    lengths: tuple[int, ...]  # what linear / root growth may pick, ascending
    pad_annealing_steps: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Curriculum:
        c = cfg.curriculum
        tokens = cfg.run.micro_batch_size * cfg.data.seq_len
        return cls(
            kind=c.kind,
            max_len=cfg.data.seq_len,
            start_len=c.start_len,
            steps=c.steps,
            stages=tuple((int(step), int(length)) for step, length in c.stages),
            lengths=tuple(curriculum_lengths(tokens, cfg.data.seq_len, c.multiple)),
            pad_annealing_steps=c.pad_annealing_steps,
        )

    def seq_len(self, step: int) -> int:
        """The row length of optimizer step ``step``: the largest allowed length not above the schedule."""
        if self.kind == "none":
            return self.max_len
        if self.kind == "stages":
            index = bisect.bisect_right([s for s, _ in self.stages], step) - 1
            return self.stages[max(index, 0)][1]
        progress = min(1.0, max(0, step - 1) / self.steps)
        if self.kind == "root":
            progress = math.sqrt(progress)
        target = self.start_len + (self.max_len - self.start_len) * progress
        index = bisect.bisect_right(self.lengths, target + 1e-9) - 1
        return max(self.lengths[max(index, 0)], self.start_len)

    def pad_share(self, step: int) -> float:
        """Probability that an EOS-padding token may be masked at ``step``; 1 without annealing."""
        if self.pad_annealing_steps == 0:
            return 1.0
        return min(1.0, step / self.pad_annealing_steps)

    def state(self, step: int) -> dict[str, Any]:
        """What the loop used at ``step``: logged every step and stored in checkpoints."""
        return {"seq_len": self.seq_len(step), "pad_share": self.pad_share(step)}

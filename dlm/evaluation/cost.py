"""What generation with a method's budgets costs, counted as the sampler counts it: canvas tokens = forward
passes × canvas width, summed over a sample's steps.

The *estimate* (:func:`schedule_cost`, :func:`estimated_canvas_tokens`) runs each schedule to its end (no early
stop at EOS) and extends a predicted canvas that has no room for the answer plus its EOS, as the sampler
would; predicted methods add their one prediction pass of ``W`` canvas positions. :func:`measure_generation`
really runs the sampler and records the measured canvas and forward tokens, wall time and, on the synthetic
task, exact-match accuracy (:func:`dlm.evaluation.synthetic.check`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from tqdm import tqdm

from dlm.evaluation.readings import EvalExample
from dlm.evaluation.report import MethodResult
from dlm.evaluation.synthetic import check
from dlm.generation import LoadedModel, block_schedule, extend_budget, generate


def first_steps(budget: int, steps_per_token: float) -> int | None:
    """The ``steps`` the sampler gets for a first canvas of ``budget`` (None: its default, one per position)."""
    return None if steps_per_token == 1.0 else max(1, round(steps_per_token * budget))


def schedule_cost(
    budget: int,
    true_length: int,
    *,
    steps_per_token: float = 1.0,
    extend: bool,
    max_length: int,
    block_length: int | None = None,
) -> tuple[int, int, int]:
    """(steps, canvas tokens, final canvas) of one sample if every schedule runs to its end.

    Mirrors the sampler: the first canvas gets :func:`first_steps` steps over :func:`block_schedule`; with
    ``extend``, a canvas without room for the answer and its EOS (``canvas <= true_length``) grows to the next
    power of two up to ``max_length``, its tail denoised at the first canvas's steps-per-token rate. Canvas
    tokens are steps × canvas width, the sampler's ``canvas_tokens``.
    """
    given = first_steps(budget, steps_per_token)
    schedule = block_schedule(0, budget, budget if given is None else given, block_length)
    steps = sum(s for _, _, s in schedule)
    tokens = steps * budget
    canvas = budget
    while extend and canvas <= true_length:
        grown = extend_budget(canvas, max_length)
        if grown is None:
            break
        tail = grown - canvas
        tail_steps = tail if given is None else max(1, math.ceil(given / budget * tail))
        added = sum(s for _, _, s in block_schedule(canvas, grown, tail_steps, block_length))
        steps += added
        tokens += added * grown
        canvas = grown
    return steps, tokens, canvas


def estimated_canvas_tokens(m: MethodResult, lengths: Sequence[int], *, steps_per_token: float,
                            block_length: int | None) -> int:
    """Method ``m``'s estimated cost on answers of ``lengths``: its prediction pass plus every sample's
    :func:`schedule_cost`."""
    return m.prediction_tokens + sum(
        schedule_cost(b, n, steps_per_token=steps_per_token, extend=m.extend, max_length=m.max_length,
                      block_length=block_length)[1]
        for b, n in zip(m.budgets, lengths)
    )


def measure_generation(
    loaded: LoadedModel,
    examples: Sequence[EvalExample],
    m: MethodResult,
    *,
    steps_per_token: float,
    batch_size: int,
    block_length: int | None,
    seed: int,
    synthetic: bool,
    progress: bool,
) -> None:
    """Run the sampler for method ``m`` (prompts grouped by budget, so each group gets its steps) and record
    measured cost, wall time and, on the synthetic task, accuracy."""
    tok = loaded.tokenizer
    by_budget: dict[int, list[int]] = {}
    for i, b in enumerate(m.budgets):
        by_budget.setdefault(b, []).append(i)
    answers: list[list[int]] = [[] for _ in examples]
    finished = [False] * len(examples)
    canvas_tokens = forward_tokens = 0
    seconds = 0.0
    bar = tqdm(total=len(examples), desc=f"generate {m.name}", unit="prompt", disable=not progress)
    for budget, idx in sorted(by_budget.items()):
        result = generate(
            loaded.model, [examples[i].prompt_ids for i in idx], mask_id=tok.mask_id, eos_id=tok.eos_id,
            pad_id=tok.pad_id, length=[budget] * len(idx), steps=first_steps(budget, steps_per_token),
            block_length=block_length, extend=m.extend, max_length=m.max_length, batch_size=batch_size, seed=seed,
            shift=loaded.shift,
        )
        for j, i in enumerate(idx):
            answers[i], finished[i] = result.answers[j], result.finished[j]
        canvas_tokens += sum(result.canvas_tokens)
        forward_tokens += result.total_forward_tokens
        seconds += result.wall_time_s
        bar.update(len(idx))
    bar.close()
    texts = [str(tok.tokenizer.decode(a, skip_special_tokens=True)) for a in answers]
    m.generated = texts
    # the prediction pass ran each prompt once more, with its W masked positions (if any) after it
    prediction_forward = sum(len(e.prompt_ids) for e in examples) + m.prediction_tokens if m.predicted else 0
    m.generation = {
        "canvas_tokens": canvas_tokens + m.prediction_tokens,
        "forward_tokens": forward_tokens + prediction_forward,
        "wall_s": seconds + m.prediction_seconds,
        "finished": sum(finished) / len(finished),
        "mean_answer_tokens": statistics.fmean(len(a) for a in answers),
    }
    if synthetic:
        m.generation["accuracy"] = sum(check(e.question, t) for e, t in zip(examples, texts)) / len(examples)

"""The length benchmark behind ``dlm eval length``: how well does each way of choosing a generation canvas
cover the true answers, how much does it over-allocate, and what does generation with it cost?

Methods, all scored on the same prompt → answer pairs (answer length = its tokens, EOS excluded, as the SFT
rows count it):

- ``fixed:N``: LLaDA's setting, one canvas of ``N`` for every prompt (default 512 and 1024). A canvas that
  would run past the model's ``max_seq_len`` after the prompt is capped there, and the table says so.
- ``zero-shot``: the seed project's baseline. The LM's own EOS probability at every canvas position in the
  state generation starts from (answer region fully masked), read as "this position is past the end" and
  turned into a bound exactly as the EOS head's is (:func:`~dlm.modeling.length_head.predict_eos_bound`).
- ``eos-head`` and ``bucket-head``: dlm's length head, read as :func:`~dlm.generation.predict_budgets` reads
  it (the same pass over ``[prompt, max_len masks]``, the same bounds and power-of-two budgets).
- ``oracle``: the true length rounded up to a power of two; the best any power-of-two budget can do.

:func:`evaluate_length` runs the steps, each owned by its module: :mod:`~dlm.evaluation.readings` reads the
data and runs the one prediction pass; :mod:`~dlm.evaluation.sweep` turns the readings into budgets at any
``q`` and scores them (coverage, the q sweep, the target-ratio and cross-fitted points, per file for a mix);
:mod:`~dlm.evaluation.cost` estimates or measures what generation costs; :mod:`~dlm.evaluation.report` holds
the result and writes its tables and JSON. The names these modules export are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dlm.errors import GenerationError
from dlm.evaluation.cost import estimated_canvas_tokens, first_steps, measure_generation, schedule_cost
from dlm.evaluation.readings import (
    DEFAULT_EVAL_FRACTION,
    EvalData,
    EvalExample,
    Readings,
    Split,
    read_all,
    read_examples,
    read_lengths,
    source_groups,
)
from dlm.evaluation.report import LengthReport, MethodResult, write_report
from dlm.evaluation.sweep import (
    CROSS_FIT_FOLDS,
    DEFAULT_TARGET_RATIO,
    FRONTIER_QS,
    PREDICTORS,
    SWEEP_QS,
    best_operating_point,
    budgets_by_q,
    coverage_at_ratio,
    cross_fitted_point,
    metrics,
    metrics_by_source,
    predicted_budgets,
    q_sweep,
)
from dlm.generation import LoadedModel, load_for_generation, next_power_of_two

__all__ = [
    "CROSS_FIT_FOLDS",
    "DEFAULT_EVAL_FRACTION",
    "DEFAULT_FIXED",
    "DEFAULT_TARGET_RATIO",
    "FRONTIER_QS",
    "PREDICTORS",
    "SWEEP_QS",
    "EvalData",
    "EvalExample",
    "LengthReport",
    "MethodResult",
    "Readings",
    "Split",
    "best_operating_point",
    "coverage_at_ratio",
    "cross_fitted_point",
    "evaluate_length",
    "first_steps",
    "predicted_budgets",
    "read_examples",
    "read_lengths",
    "schedule_cost",
    "write_report",
]

DEFAULT_FIXED: tuple[int, ...] = (512, 1024)
_RULES = {"zero-shot": "LM's EOS probability at step 0", "eos-head": "EOS head", "bucket-head": "bucket head"}


def evaluate_length(
    data: str | Path | Sequence[str | Path],
    model: str | Path | LoadedModel,
    *,
    q: float = 0.9,
    fixed: Sequence[int] = DEFAULT_FIXED,
    limit: int | None = None,
    batch_size: int = 8,
    run_generation: bool = False,
    steps_per_token: float = 1.0,
    block_length: int | None = None,
    split: Split = "all",
    eval_fraction: float | None = None,
    template: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    target_ratio: float = DEFAULT_TARGET_RATIO,
) -> LengthReport:
    """Score every method on ``data`` (a file, or several files read one after the other) for ``model`` (a run
    directory or checkpoint that :func:`~dlm.generation.load_for_generation` reads, or a loaded model).

    Metrics per method: ``coverage`` (share of prompts whose budget ≥ the true answer length), ``mean_ratio`` /
    ``median_ratio`` (budget / true length), ``bucket_accuracy`` (budget in the true length's power-of-two
    bucket over the head's buckets), ``mean_budget``, and ``est_canvas_tokens`` (:mod:`dlm.evaluation.cost`).
    ``frontier``: each predictor's best coverage with a mean budget / true length within ``target_ratio``
    (:func:`coverage_at_ratio`) and ``cross_fitted`` the same with q chosen on other folds
    (:func:`cross_fitted_point`); with several files, every method's metrics per file too (``by_source``) and
    each predictor's in-sample and cross-fitted points on each file alone (``frontier_by_source``,
    ``cross_fitted_by_source``): a goal stated per file is met only when its own q, fixed in advance, meets it.
    A model without a length head still gets the fixed, zero-shot and oracle methods, with a note.
    """
    _check_args(q, fixed, limit, batch_size, steps_per_token, target_ratio)
    loaded = model if isinstance(model, LoadedModel) else load_for_generation(model, device=device)
    source = read_all(data, loaded, template=template, split=split, eval_fraction=eval_fraction, limit=limit)
    examples, notes = source.examples, list(source.notes)
    lengths = [e.length for e in examples]
    head = loaded.model.length_head
    max_seq_len = loaded.model.cfg.max_seq_len
    width = head.cfg.max_len if head is not None else min(max(fixed), max_seq_len)
    if head is None:
        notes.append("the model has no length head: eos-head and bucket-head are skipped; train with "
                     "model.length_head set to evaluate them")

    readings = read_lengths(loaded, examples, width, batch_size=batch_size, progress=progress)
    predictors = [p for p in PREDICTORS if head is not None or p == "zero-shot"]
    methods = [*(_fixed_method(size, examples, max_seq_len) for size in fixed),
               *_predictor_methods(readings, predictors, q, len(examples)), _oracle(lengths)]
    groups = source_groups(examples)
    groups = groups if len(groups) > 1 else {}  # one file: no per-file scores
    for m in methods:
        _score(m, lengths, groups, readings.edges, steps_per_token=steps_per_token, block_length=block_length)
    if run_generation:
        for m in methods:
            measure_generation(loaded, examples, m, steps_per_token=steps_per_token, batch_size=batch_size,
                               block_length=block_length, seed=seed, synthetic=source.synthetic, progress=progress)
    budgets_at = {name: budgets_by_q(readings, name) for name in predictors}  # shared by every target search
    by_file = {src: ({name: _restricted(at, idx) for name, at in budgets_at.items()}, [lengths[i] for i in idx])
               for src, idx in groups.items()}
    return LengthReport(
        data=str(data) if isinstance(data, (str, Path)) else ", ".join(map(str, data)),
        model=str(loaded.directory), layout=source.layout, template=source.template, synthetic=source.synthetic,
        q=q, width=width, steps_per_token=steps_per_token, lengths=lengths, methods=methods,
        sweep=q_sweep(readings, lengths, predictors, q), notes=notes, generated=run_generation,
        target_ratio=target_ratio,
        frontier_by_source={src: {name: best_operating_point(at, file_lengths, target_ratio)
                                  for name, at in ats.items()} for src, (ats, file_lengths) in by_file.items()},
        frontier={name: best_operating_point(at, lengths, target_ratio) for name, at in budgets_at.items()},
        cross_fitted={name: cross_fitted_point(at, lengths, target_ratio) for name, at in budgets_at.items()},
        cross_fitted_by_source={src: {name: cross_fitted_point(at, file_lengths, target_ratio)
                                      for name, at in ats.items()} for src, (ats, file_lengths) in by_file.items()},
    )


def _restricted(budgets_at: Callable[[float], Sequence[int]], idx: Sequence[int]) -> Callable[[float], list[int]]:
    """``q -> budgets`` of the examples ``idx`` alone (one file of a mix), from the mix's cached budgets."""
    return lambda q: [budgets_at(q)[i] for i in idx]


def _fixed_method(size: int, examples: Sequence[EvalExample], max_seq_len: int) -> MethodResult:
    """One canvas of ``size`` for every prompt, capped where it would run past ``max_seq_len`` after the prompt."""
    budgets = [max(1, min(size, max_seq_len - len(e.prompt_ids))) for e in examples]
    capped = sum(b < size for b in budgets)
    note = f"capped at max_seq_len {max_seq_len} − prompt for {capped} of {len(budgets)} prompts" if capped else ""
    return MethodResult(f"fixed:{size}", f"{size} positions", budgets, False, max(budgets), note=note)


def _predictor_methods(readings: Readings, predictors: Sequence[str], q: float, n: int) -> list[MethodResult]:
    """The predictors' budgets at ``q``, each charged its prediction pass (``width`` positions per prompt, none
    for a bucket head read from the prompt alone) and the pass's wall time (the LM-head reading only for
    zero-shot, which alone needs it)."""
    methods = []
    for name in predictors:
        _, budgets = predicted_budgets(readings, name, q)
        width, seconds = readings.bucket_pass if name == "bucket-head" else (readings.width, readings.backbone_seconds)
        seconds += readings.lm_seconds if name == "zero-shot" else 0.0
        methods.append(MethodResult(name, _RULES[name] + f", q = {q:g}, next power of two", budgets, True,
                                    readings.width, prediction_tokens=width * n, prediction_seconds=seconds,
                                    predicted=True))
    return methods


def _oracle(lengths: Sequence[int]) -> MethodResult:
    """The true length rounded up to a power of two: the best any power-of-two budget can do."""
    budgets = [next_power_of_two(n) for n in lengths]
    # an answer of exactly a power of two fills its canvas with no room for EOS: let it extend once
    return MethodResult("oracle", "next power of two of the true length", budgets, True, 2 * max(budgets))


def _score(m: MethodResult, lengths: Sequence[int], groups: dict[str, list[int]], edges: Sequence[int], *,
           steps_per_token: float, block_length: int | None) -> None:
    """Fill ``m``'s metrics (per file too when ``groups`` holds several) and its estimated canvas tokens."""
    m.metrics = metrics(m.budgets, lengths, edges)
    if groups:
        m.by_source = metrics_by_source(m.budgets, lengths, groups, edges)
    m.metrics["est_canvas_tokens"] = estimated_canvas_tokens(m, lengths, steps_per_token=steps_per_token,
                                                             block_length=block_length)


def _check_args(q: float, fixed: Sequence[int], limit: int | None, batch_size: int, steps_per_token: float,
                target_ratio: float) -> None:
    """Refuse every bad argument at once, in one line, before a model is loaded or a file read."""
    problems = []
    if not 0.0 < q <= 1.0:
        problems.append(f"--q must be in (0, 1], got {q}")
    if not fixed or any(n < 1 for n in fixed):
        problems.append(f"--fixed needs positive canvas sizes, got {list(fixed)}")
    if limit is not None and limit < 1:
        problems.append(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 < steps_per_token <= 1.0:
        problems.append(f"--steps-per-token must be in (0, 1], got {steps_per_token}")
    if not target_ratio >= 1.0:
        problems.append(f"--target-ratio must be >= 1 (a budget below the true length covers nothing), "
                        f"got {target_ratio}")
    if problems:
        raise GenerationError("; ".join(problems))

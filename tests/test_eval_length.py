"""The length benchmark: its metrics on a hand-made data set whose answer lengths are known, its budgets
against the sampler's own budget prediction, its cost estimate against the sampler's cost accounting, the
files and plots it writes, and how it behaves without a length head or with bad inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_model
from torch import Tensor

from dlm.cli import main
from dlm.evaluation.length import (
    EvalExample,
    LengthReport,
    Readings,
    best_operating_point,
    coverage_at_ratio,
    cross_fitted_point,
    evaluate_length,
    first_steps,
    predicted_budgets,
    read_examples,
    read_lengths,
    schedule_cost,
)
from dlm.evaluation.synthetic import check
from dlm.generation import LoadedModel, PredictedLength, generate, load_for_generation, predict_budgets
from dlm.modeling import LengthHeadConfig, build_model, preset

# answers of 3, 10, 20 and 40 tokens (every "cat" is one GPT-2 token)
LENGTHS = (3, 10, 20, 40)
MAX_SEQ_LEN = 128


def _write_data(path: Path, lengths: tuple[int, ...] = LENGTHS) -> Path:
    rows = [{"question": f"Repeat the word cat {n} times.", "answer": " ".join(["cat"] * n)} for n in lengths]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_run(run_dir: Path, *, head: bool) -> None:
    """A tiny random model saved the way a run directory is, with a length head whose outputs are random
    (a zero-initialised head would predict the same budget for every prompt, which tests nothing)."""
    cfg = preset("tiny", n_layers=1, max_seq_len=MAX_SEQ_LEN,
                 length_head=LengthHeadConfig(max_len=32) if head else None)
    torch.manual_seed(0)
    model = build_model(cfg)
    if model.length_head is not None:
        for layer in (model.length_head.eos.out, model.length_head.bucket.out):
            torch.nn.init.normal_(layer.weight, std=0.5)
            torch.nn.init.normal_(layer.bias, std=1.0)
    run_dir.mkdir(parents=True)
    save_model(model, str(run_dir / "model.safetensors"))
    (run_dir / "model_config.json").write_text(cfg.model_dump_json())
    config = {"tokenizer": {"name_or_path": "gpt2-mdm"}, "data": {"format": "sft", "sft_template": "plain"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("length_eval")
    _write_run(root / "head", head=True)
    _write_run(root / "plain", head=False)
    return {"head": root / "head", "plain": root / "plain", "data": _write_data(root / "cats.jsonl")}


@pytest.fixture(scope="module")
def loaded(runs: dict[str, Path]) -> LoadedModel:
    return load_for_generation(runs["head"], device="cpu")


def _eval(runs: dict[str, Path], model: Any, **kwargs: Any) -> LengthReport:
    return evaluate_length(runs["data"], model, progress=False, **kwargs)


def test_fixed_canvases_and_the_oracle_on_known_lengths(runs: dict[str, Path], loaded: LoadedModel) -> None:
    report = _eval(runs, loaded, fixed=[16, 512])
    assert report.lengths == list(LENGTHS) and report.synthetic

    fixed16 = report.method("fixed:16")
    assert fixed16.budgets == [16] * 4 and not fixed16.note
    assert fixed16.metrics["coverage"] == 0.5  # 3 and 10 fit, 20 and 40 do not
    assert fixed16.metrics["mean_ratio"] == pytest.approx(sum(16 / n for n in LENGTHS) / 4)
    assert fixed16.metrics["est_canvas_tokens"] == 4 * 16 * 16  # 16 steps over a 16-token canvas each

    # 512 does not fit after the prompt in a 128-position model: capped per prompt, and the table says so
    fixed512 = report.method("fixed:512")
    prompt_lens = [len(e.prompt_ids) for e in read_examples(runs["data"], loaded).examples]
    assert fixed512.budgets == [MAX_SEQ_LEN - p for p in prompt_lens]
    assert "capped at max_seq_len 128" in fixed512.note and "capped" in report.markdown()
    assert fixed512.metrics["coverage"] == 1.0
    assert fixed512.metrics["est_canvas_tokens"] == sum(b * b for b in fixed512.budgets)

    oracle = report.method("oracle")
    assert oracle.budgets == [4, 16, 32, 64]
    assert oracle.metrics["coverage"] == 1.0 and oracle.metrics["bucket_accuracy"] == 1.0
    assert all(1 <= b / n <= 2 for b, n in zip(oracle.budgets, LENGTHS))
    # relative cost in the table: the oracle against fixed:16
    ratio = oracle.metrics["est_canvas_tokens"] / fixed16.metrics["est_canvas_tokens"]
    assert f"{ratio:.3f}×" in report.markdown()


def test_fewer_steps_per_token_cost_proportionally_less(runs: dict[str, Path], loaded: LoadedModel) -> None:
    report = _eval(runs, loaded, fixed=[16], steps_per_token=0.5)
    assert report.method("fixed:16").metrics["est_canvas_tokens"] == 4 * 8 * 16


def test_head_budgets_are_the_samplers_budgets(loaded: LoadedModel) -> None:
    prompts = [[11, 12, 13], [5, 6, 7, 8, 9, 10, 11], [42]]
    examples = [EvalExample("", p, [1]) for p in prompts]
    readings = read_lengths(loaded, examples, 32, batch_size=2, progress=False)
    tok = loaded.tokenizer
    seen = set()
    for q in (0.3, 0.5, 0.7, 0.9):
        for method, head in (("eos-head", "eos"), ("bucket-head", "bucket")):
            _, ours = predicted_budgets(readings, method, q)
            theirs = predict_budgets(loaded.model, [torch.tensor(p) for p in prompts], PredictedLength(q, head),
                                     mask_id=tok.mask_id, pad_id=tok.pad_id)
            assert ours == theirs.budgets, (method, q)
            seen.update(ours)
    assert len(seen) > 1  # the random head really discriminates, so the comparison means something


def test_zero_shot_reading_is_the_lms_eos_probability(loaded: LoadedModel) -> None:
    prompt = [11, 12, 13, 14]
    readings = read_lengths(loaded, [EvalExample("", prompt, [1])], 32, progress=False)
    tok = loaded.tokenizer
    ids = torch.tensor([prompt + [tok.mask_id] * 32])
    with torch.no_grad():
        probs = torch.softmax(loaded.model.logits(loaded.model(ids)).float(), dim=-1)[0, 4:, tok.eos_id]
    assert torch.allclose(torch.from_numpy(readings.zero_shot[0]), probs, atol=1e-6)
    # a shift model (objective.shift) reads canvas position i from the state at i - 1, as the sampler does
    with torch.no_grad():
        probs = torch.softmax(loaded.model.logits(loaded.model(ids)).float(), dim=-1)[0, 3:-1, tok.eos_id]
    shifted = read_lengths(replace(loaded, shift=True), [EvalExample("", prompt, [1])], 32, progress=False)
    assert torch.allclose(torch.from_numpy(shifted.zero_shot[0]), probs, atol=1e-6)


class _NeverEos:
    """The tiny model with EOS made impossible, so every schedule runs to its end and canvases extend."""

    def __init__(self, model: Any, eos_id: int) -> None:
        self.model, self.eos_id = model, eos_id

    def parameters(self) -> Any:
        return self.model.parameters()

    def __call__(self, input_ids: Tensor, doc_ids: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        return self.model(input_ids, doc_ids=doc_ids, position_ids=position_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        out = self.model.logits(hidden)
        out[..., self.eos_id] = float("-inf")
        return out


@pytest.mark.parametrize(("budget", "spt", "block", "extend"),
                         [(16, 1.0, None, True), (20, 0.5, None, True), (16, 0.5, 8, True), (24, 1.0, None, False)])
def test_cost_estimate_equals_the_samplers_accounting(
    loaded: LoadedModel, budget: int, spt: float, block: int | None, extend: bool
) -> None:
    tok = loaded.tokenizer
    result = generate(_NeverEos(loaded.model, tok.eos_id), [[11, 12, 13]], mask_id=tok.mask_id, eos_id=tok.eos_id,
                      length=[budget], steps=first_steps(budget, spt), block_length=block, extend=extend,
                      max_length=64)
    steps, tokens, canvas = schedule_cost(budget, 10**6, steps_per_token=spt, extend=extend, max_length=64,
                                          block_length=block)
    assert (steps, tokens, canvas) == (result.steps[0], result.canvas_tokens[0], result.canvas_lengths[0])
    assert canvas == (64 if extend else budget)


def test_generate_reports_the_samplers_cost_and_checked_accuracy(runs: dict[str, Path], loaded: LoadedModel) -> None:
    report = evaluate_length(runs["data"], loaded, fixed=[16], limit=3, run_generation=True, steps_per_token=0.25,
                             progress=False)
    assert report.generated and "## Generation (measured)" in report.markdown()
    tok = loaded.tokenizer
    examples = read_examples(runs["data"], loaded, limit=3).examples
    for name in ("fixed:16", "bucket-head", "oracle"):
        m = report.method(name)
        assert m.generation is not None and m.generated is not None
        direct_tokens = 0
        for budget in sorted(set(m.budgets)):
            idx = [i for i, b in enumerate(m.budgets) if b == budget]
            result = generate(loaded.model, [examples[i].prompt_ids for i in idx], mask_id=tok.mask_id,
                              eos_id=tok.eos_id, pad_id=tok.pad_id, length=[budget] * len(idx), extend=m.extend,
                              steps=first_steps(budget, 0.25), max_length=m.max_length, seed=0)
            direct_tokens += sum(result.canvas_tokens)
        assert m.generation["canvas_tokens"] == direct_tokens + m.prediction_tokens
        assert m.prediction_tokens == (32 * 3 if name == "bucket-head" else 0)
        expected = sum(check(e.question, t) for e, t in zip(examples, m.generated)) / 3
        assert m.generation["accuracy"] == expected
    fixed, bucket = report.method("fixed:16").generation, report.method("bucket-head").generation
    assert fixed is not None and bucket is not None
    (row,) = [c for c in report.comparisons() if c["method"] == "bucket-head"]
    assert row["fixed"] == "fixed:16" and row["saving"] == fixed["canvas_tokens"] / bucket["canvas_tokens"]
    assert row["accuracy_delta"] == pytest.approx(100 * (bucket["accuracy"] - fixed["accuracy"]))
    assert "## Against the fixed canvases" in report.markdown()
    assert report.as_dict()["comparisons"] == report.comparisons()


def test_cli_writes_tables_json_and_plots(runs: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["eval", "length", "--data", str(runs["data"]), "--model", str(runs["head"]), "--out", str(out),
            "--fixed", "16,32", "--q", "0.75", "--device", "cpu"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| bucket-head |" in stdout and "| oracle |" in stdout
    names = {"fixed:16", "fixed:32", "zero-shot", "eos-head", "bucket-head", "oracle"}
    result = json.loads((out / "length_eval.json").read_text())
    assert set(result["methods"]) == names and result["q"] == 0.75 and result["true_lengths"] == list(LENGTHS)
    assert all(len(m["budgets"]) == 4 and 0 <= m["metrics"]["coverage"] <= 1 for m in result["methods"].values())
    assert set(result["sweep"]) == {"zero-shot", "eos-head", "bucket-head"}
    # coverage can only grow with q, and the q of the table is a point of the sweep
    for points in result["sweep"].values():
        assert [p["coverage"] for p in points] == sorted(p["coverage"] for p in points)
    (at_q,) = [p for p in result["sweep"]["bucket-head"] if p["q"] == 0.75]
    assert at_q["coverage"] == result["methods"]["bucket-head"]["metrics"]["coverage"]
    assert "| bucket-head | " in stdout.split("### Coverage / mean b/L as q sweeps")[1]
    assert (out / "length_eval.md").read_text().startswith("# Length budgets")
    for png in ("predicted_vs_true.png", "coverage_vs_budget.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_model_without_a_head_still_gets_the_other_methods(runs: dict[str, Path]) -> None:
    report = _eval(runs, runs["plain"], fixed=[16, 64], device="cpu")
    assert [m.name for m in report.methods] == ["fixed:16", "fixed:64", "zero-shot", "oracle"]
    assert any("no length head" in n for n in report.notes) and "no length head" in report.markdown()
    assert report.width == 64 and len(report.method("zero-shot").budgets) == 4


def test_held_out_and_train_splits_partition_the_data(runs: dict[str, Path], loaded: LoadedModel,
                                                      tmp_path: Path) -> None:
    data = _write_data(tmp_path / "many.jsonl", tuple(range(2, 42)))
    held = read_examples(data, loaded, split="held-out", eval_fraction=0.5).examples
    train = read_examples(data, loaded, split="train", eval_fraction=0.5).examples
    assert held and train and len(held) + len(train) == 40
    assert not {e.question for e in held} & {e.question for e in train}


def test_bad_inputs_are_one_line_errors(runs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "length", "--model", str(runs["head"]), "--device", "cpu"]
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "hello"}) + "\n")
    assert main([*base, "--data", str(odd)]) == 2
    assert "none of the SFT layouts" in capsys.readouterr().err
    assert main([*base, "--data", str(runs["data"]), "--fixed", "16,big"]) == 2
    assert "--fixed" in capsys.readouterr().err
    assert main([*base, "--data", str(runs["data"]), "--q", "1.5"]) == 2
    assert "--q must be in (0, 1]" in capsys.readouterr().err
    assert main(["eval", "length", "--data", str(runs["data"]), "--model", str(tmp_path / "nowhere")]) == 2


def test_an_sft_mix_of_files_with_different_layouts(runs: dict[str, Path], loaded: LoadedModel,
                                                    tmp_path: Path) -> None:
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Name two colours.", "input": "", "output": "red blue"},
                                  {"instruction": "Say yes.", "input": "Politely.", "output": "yes please"}]))
    report = evaluate_length([runs["data"], alpaca], loaded, fixed=[16], progress=False)
    assert report.lengths == [*LENGTHS, 2, 2] and report.layout == "qa+alpaca"
    assert not report.synthetic  # alpaca answers cannot be checked exactly
    assert any("cats.jsonl 4, alpaca.json 2" in n for n in report.notes)

    # every method also scored per file: counts, the known per-file coverage, and the mix as their weighted mean
    fixed16 = report.method("fixed:16")
    assert set(fixed16.by_source) == {"cats.jsonl", "alpaca.json"}
    assert fixed16.by_source["cats.jsonl"]["examples"] == 4 and fixed16.by_source["alpaca.json"]["examples"] == 2
    assert fixed16.by_source["cats.jsonl"]["coverage"] == 0.5 and fixed16.by_source["alpaca.json"]["coverage"] == 1
    assert fixed16.by_source["alpaca.json"]["mean_ratio"] == 8.0  # 16 / 2 for both answers
    for m in report.methods:
        for key in ("coverage", "mean_ratio"):
            mixed = sum(v["examples"] * v[key] for v in m.by_source.values()) / 6
            assert mixed == pytest.approx(m.metrics[key])
    table = report.markdown().split("### By data file: coverage / mean b/L")[1]
    assert "| method | cats.jsonl (4) | alpaca.json (2) |" in table and "| fixed:16 | 50.0% / " in table
    assert report.as_dict()["methods"]["oracle"]["by_source"]["alpaca.json"]["coverage"] == 1.0
    # each file's own best point at the target ratio is the point the file alone gets
    alone = evaluate_length(runs["data"], loaded, fixed=[16], progress=False).frontier
    assert set(report.frontier_by_source) == {"cats.jsonl", "alpaca.json"}
    for name, point in report.frontier_by_source["cats.jsonl"].items():
        assert (point is None) == (alone[name] is None)
        if point is not None:
            assert point["q"] == alone[name]["q"] and point["coverage"] == alone[name]["coverage"]
    # and each file's q fixed in advance: the cross-fitted point of that file's examples alone
    alone_report = evaluate_length(runs["data"], loaded, fixed=[16], progress=False)
    assert set(report.cross_fitted_by_source) == {"cats.jsonl", "alpaca.json"}
    for name, cross in report.cross_fitted_by_source["cats.jsonl"].items():
        assert cross == alone_report.cross_fitted[name]
    assert all(len(c["qs"]) == 2 for c in report.cross_fitted_by_source["alpaca.json"].values())  # 2 examples, 2 folds
    text = report.markdown()
    assert "Each data file alone (its own q; then q fixed in advance on that file):" in text
    assert "| predictor | cats.jsonl | cats.jsonl, q in advance | alpaca.json | alpaca.json, q in advance |" in text
    assert report.as_dict()["cross_fitted_by_source"]["cats.jsonl"] == report.cross_fitted_by_source["cats.jsonl"]


def test_two_files_of_the_same_name_are_told_apart_by_path(runs: dict[str, Path], loaded: LoadedModel,
                                                           tmp_path: Path) -> None:
    other = _write_data(tmp_path / "cats.jsonl", (5, 6))
    report = evaluate_length([runs["data"], other], loaded, fixed=[16], progress=False)
    assert set(report.method("fixed:16").by_source) == {str(runs["data"]), str(other)}
    assert set(report.frontier_by_source) == {str(runs["data"]), str(other)}


def test_one_file_has_no_per_file_table(runs: dict[str, Path], loaded: LoadedModel) -> None:
    report = _eval(runs, loaded, fixed=[16])
    assert all(not m.by_source for m in report.methods) and not report.frontier_by_source
    assert not report.cross_fitted_by_source
    assert "By data file" not in report.markdown() and "Each data file alone" not in report.markdown()


def test_readings_subset_keeps_the_chosen_rows() -> None:
    readings = _bucket_readings([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.3, 0.4]])
    part = readings.subset([2, 0])
    assert part.bucket is not None and np.array_equal(part.bucket, readings.bucket[[2, 0]])
    assert part.zero_shot.shape == (2, 64) and part.edges == readings.edges and part.width == readings.width


def _bucket_readings(probs: list[list[float]]) -> Readings:
    """Readings of a bucket head over buckets 16 / 32 / 64 with the given distributions (other heads unused)."""
    n = len(probs)
    blank = np.zeros((n, 64), dtype=np.float32)
    return Readings(64, blank, blank, np.array(probs, dtype=np.float32), [16, 32, 64], 16)


def test_best_coverage_at_a_target_ratio_on_known_distributions() -> None:
    """Answers of 10, 20 and 40 tokens. For q in (0.6, 0.9] the budgets are 16 / 32 / 64: everything covered at
    mean b/L 1.6; above 0.9 the first answer gets 32 (mean 2.13); at or below 0.6 the second and third miss."""
    lengths = [10, 20, 40]
    readings = _bucket_readings([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.3, 0.4]])
    point = coverage_at_ratio(readings, lengths, ["bucket-head"], 2.0)["bucket-head"]
    assert point == {"q": 0.61, "coverage": 1.0, "mean_ratio": pytest.approx(1.6)}  # the cheapest q of the plateau
    wide = coverage_at_ratio(readings, lengths, ["bucket-head"], 2.2)["bucket-head"]
    assert wide is not None and wide["coverage"] == 1.0 and wide["mean_ratio"] == pytest.approx(1.6)
    # within 1.5 only q <= 0.6 qualifies: one answer in three, and of equal coverage the cheaper (16 / 16 / 16)
    tight = coverage_at_ratio(readings, lengths, ["bucket-head"], 1.5)["bucket-head"]
    assert tight is not None and tight["coverage"] == pytest.approx(1 / 3)
    assert tight["mean_ratio"] == pytest.approx((16 / 10 + 16 / 20 + 16 / 40) / 3)
    # a 3-token answer always gets at least the 16 minimum: no q keeps the mean within 5
    assert coverage_at_ratio(_bucket_readings([[1.0, 0.0, 0.0]]), [3], ["bucket-head"], 5.0)["bucket-head"] is None


def test_cross_fitted_point_scores_each_fold_with_the_q_of_the_others() -> None:
    """Folds {0, 2} (answers of 20) and {1, 3} (answers of 9); q 0.5 gives 16-token budgets, q 1.0 32-token ones.
    On all four, only q 0.5 keeps the mean b/L within 2 (half covered). Cross-fitted: the 9-token fold's q is
    picked on the 20-token fold (1.0: 32 covers 20 at 1.6), the 20-token fold's on the 9-token one (0.5: 16 covers
    9 at 1.78), so the 20s are missed, the 9s covered at 32 / 9, and the pooled mean lands above the target."""
    lengths = [20, 9, 20, 9]
    budgets_at = {0.5: [16] * 4, 1.0: [32] * 4}.__getitem__
    inside = best_operating_point(budgets_at, lengths, 2.0, qs=(0.5, 1.0))
    assert inside == {"q": 0.5, "coverage": 0.5, "mean_ratio": pytest.approx((16 / 20 + 16 / 9) / 2)}
    point = cross_fitted_point(budgets_at, lengths, 2.0, folds=2, qs=(0.5, 1.0))
    assert point == {"coverage": 0.5, "mean_ratio": pytest.approx((16 / 20 + 32 / 9) / 2), "qs": [0.5, 1.0]}
    assert point["mean_ratio"] > 2.0
    # no q of the others fits the target: the fold gets the smallest q
    tight = cross_fitted_point(budgets_at, lengths, 1.0, folds=2, qs=(0.5, 1.0))
    assert tight is not None and tight["qs"] == [0.5, 0.5] and tight["coverage"] == 0.5  # the 9s still fit in 16
    # identical examples: every fold picks the in-sample q, so the two figures agree
    same = cross_fitted_point(lambda q: [32 if q == 1.0 else 16] * 10, [12] * 10, 2.0, qs=(0.5, 1.0))
    assert same == {"coverage": 1.0, "mean_ratio": pytest.approx(16 / 12), "qs": [0.5] * 5}
    assert cross_fitted_point(budgets_at, [12], 2.0) is None


def test_report_carries_the_target_ratio_point(runs: dict[str, Path], loaded: LoadedModel,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _eval(runs, loaded, fixed=[16], target_ratio=3.0)
    assert report.target_ratio == 3.0 and set(report.frontier) == {"zero-shot", "eos-head", "bucket-head"}
    for name, point in report.frontier.items():
        # no q of the coarse sweep that stays within the target covers more than the fine search found
        within = [p for p in report.sweep[name] if p["mean_ratio"] <= 3.0]
        if point is None:
            assert not within
        else:
            assert point["mean_ratio"] <= 3.0 and all(p["coverage"] <= point["coverage"] for p in within)
    assert "### Best coverage at mean b/L ≤ 3" in report.markdown()
    assert json.loads(json.dumps(report.as_dict()))["frontier"] == report.frontier
    assert set(report.cross_fitted) == set(report.frontier)
    folds = min(5, len(report.lengths))
    assert all(c is not None and len(c["qs"]) == folds for c in report.cross_fitted.values())
    assert json.loads(json.dumps(report.as_dict()))["cross_fitted"] == report.cross_fitted
    assert "q fixed in advance (5-fold)" in report.markdown()
    base = ["eval", "length", "--data", str(runs["data"]), "--model", str(runs["head"]), "--device", "cpu"]
    assert main([*base, "--target-ratio", "0.5"]) == 2
    assert "--target-ratio must be >= 1" in capsys.readouterr().err

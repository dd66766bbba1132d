"""``dlm fit-head``: the length head fitted on a frozen backbone's cached states. It must train on exactly the
state inference reads, learn the lengths it is shown, read only the training split, never return a head worse
than the one it started from, leave every backbone tensor as it was, and refuse what it cannot do."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dlm.training.head_fit as head_fit
from dlm.cli import main
from dlm.errors import GenerationError
from dlm.evaluation.cost import measure_generation
from dlm.evaluation.length import evaluate_length, read_all, read_lengths
from dlm.evaluation.sweep import predicted_budgets
from dlm.generation import PredictedLength, load_for_generation, predict_budgets
from dlm.modeling import LengthHead
from dlm.training.head_fit import (
    HeadFitError,
    cached_features,
    extract_features,
    fit_head,
    fit_length_head,
    score_head,
)
from dlm.training.state_cache import HeadFeatures, StateCache, StateCacheError, example_key

from .test_eval_length import _write_data, _write_run

LENGTHS = tuple(range(1, 41))  # buckets 16 and 32 of a max_len 32 head: 1-16 short, 17-40 long


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("head_fit")
    _write_run(root / "head", head=True)
    _write_run(root / "plain", head=False)
    config = root / "head" / "config.yaml"
    run = yaml.safe_load(config.read_text())
    run["data"]["eval_fraction"] = 0.25  # a held-out split of about 10 examples
    config.write_text(yaml.safe_dump(run))
    return {"root": root, "head": root / "head", "plain": root / "plain",
            "data": _write_data(root / "cats.jsonl", LENGTHS)}


@pytest.fixture(scope="module")
def cached(setup: dict[str, Path]) -> tuple[LengthHead, HeadFeatures]:
    """The tiny run's head and its backbone's states over every example of the data file."""
    loaded = load_for_generation(setup["head"], device="cpu")
    head = loaded.model.length_head
    assert head is not None
    examples = read_all(setup["data"], loaded, template=None, split="all", eval_fraction=None, limit=None).examples
    return head, extract_features(loaded, examples, head.cfg.max_len, progress=False)


def test_fit_learns_the_lengths_it_is_shown(setup: dict[str, Path], cached: tuple[LengthHead, HeadFeatures]) -> None:
    head, feats = cached
    everything = list(range(len(feats)))
    before = score_head(head, feats, everything, 16)
    result = fit_length_head(head, feats, epochs=300, lr=3e-2, val_fraction=0.0, batch_size=16, progress=False)
    fitted = LengthHead(feats.canvas.shape[-1], head.cfg)
    fitted.load_state_dict(result.state)
    after = score_head(fitted, feats, everything, 16)
    # the random head starts near chance; a linear probe on 40 distinct prompts separates the two buckets
    assert before["bucket_acc"] < 0.8
    assert after["bucket_acc"] >= 0.95
    assert after["eos_bce"] < 0.5 * before["eos_bce"]
    assert result.best_epoch == {"eos": 300, "bucket": 300} and len(result.history) == 301
    assert result.state.keys() == head.state_dict().keys()
    untouched = load_for_generation(setup["head"], device="cpu").model.length_head
    assert untouched is not None and torch.equal(head.bucket.out.weight, untouched.bucket.out.weight)


def test_fits_on_the_state_inference_reads(setup: dict[str, Path]) -> None:
    """The cached states are the benchmark's prediction pass: the head on them gives the same probabilities
    as ``dlm eval length`` reads from the model, padding and all."""
    loaded = load_for_generation(setup["head"], device="cpu")
    head = loaded.model.length_head
    assert head is not None
    examples = read_all(setup["data"], loaded, template=None, split="all", eval_fraction=None, limit=None).examples
    width = head.cfg.max_len
    feats = extract_features(loaded, examples, width, batch_size=3, progress=False)
    readings = read_lengths(loaded, examples, width, batch_size=5, progress=False)
    for i in range(len(examples)):
        prompt, mask, canvas = feats.batch([i, (i + 7) % len(examples)])  # padded beside another prompt length
        with torch.no_grad():
            out = head.read(prompt, mask, canvas)
            row_mask = torch.cat([mask, torch.zeros(mask.shape[0], canvas.shape[1], dtype=torch.bool)], dim=1)
            whole = head(torch.cat([prompt, canvas], dim=1), row_mask)  # read() is forward() on one row
        torch.testing.assert_close(out.bucket_probs()[0].numpy(), readings.bucket[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.eos_probs()[0].numpy(), readings.eos_head[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(whole.bucket_logits, out.bucket_logits, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(whole.eos_logits[:, prompt.shape[1] :], out.eos_logits, atol=1e-6, rtol=1e-5)


def test_cli_writes_a_new_run_and_keeps_the_backbone(setup: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out, cache = tmp_path / "fitted", tmp_path / "states"
    args = ["fit-head", "--model", str(setup["head"]), "--data", str(setup["data"]), "--out", str(out),
            "--cache", str(cache), "--epochs", "40", "--lr", "1e-2", "--val-fraction", "0.2", "--device", "cpu"]
    assert main(args) == 0
    assert "bucket head: epoch" in capsys.readouterr().out
    before, after = load_file(setup["head"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        if not name.startswith("length_head."):
            assert torch.equal(tensor, after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("length_head."))
    record = json.loads((out / "head_fit.json").read_text())
    assert (out / "head_fit.png").stat().st_size > 0
    # only the training split is read: the run's content-hash split at the default eval fraction
    loaded = load_for_generation(setup["head"], device="cpu")
    train = read_all(setup["data"], loaded, template=None, split="train", eval_fraction=None, limit=None).examples
    held_out = read_all(setup["data"], loaded, template=None, split="held-out", eval_fraction=None, limit=None).examples
    assert record["examples"] == {"cats.jsonl": len(train)} and len(held_out) > 0
    assert record["train_examples"] + record["val_examples"] == len(train)
    history, kept = record["history"], record["best_epoch"]
    assert history[kept["eos"]]["val_eos_bce"] <= history[0]["val_eos_bce"]
    assert history[kept["bucket"]]["val_bucket_ce"] <= history[0]["val_bucket_ce"]
    assert (out / "config.yaml").read_text() == (setup["head"] / "config.yaml").read_text()
    fitted = load_for_generation(out, device="cpu")  # a run directory generation and eval load as any other
    assert fitted.model.length_head is not None
    # a second fit reads the cache instead of the backbone; another out, same states
    stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert main([*args[:6], str(tmp_path / "again"), *args[7:]]) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == after.keys()


def test_a_prompt_pass_fit_is_read_from_the_prompt_alone(setup: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``--pass prompt``: the bucket head is fitted on states of the prompt alone, the new run says so, and
    generation and ``dlm eval length`` both read it from that pass (same probabilities as the fit's states);
    the EOS head, with no canvas to read, keeps its weights and is refused as a generation head."""
    out = tmp_path / "prompt-fitted"
    args = ["fit-head", "--model", str(setup["head"]), "--data", str(setup["data"]), "--out", str(out),
            "--pass", "prompt", "--epochs", "200", "--lr", "3e-2", "--val-fraction", "0", "--device", "cpu"]
    assert main(args) == 0
    assert "EOS head: not fitted" in capsys.readouterr().out
    record = json.loads((out / "head_fit.json").read_text())
    assert record["canvas"] == 0 and record["prediction_pass"] == "prompt" and not record["eos_fitted"]
    assert json.loads((out / "model_config.json").read_text())["length_head"]["prediction_pass"] == "prompt"
    source = load_for_generation(setup["head"], device="cpu")
    fitted = load_for_generation(out, device="cpu")
    head, was = fitted.model.length_head, source.model.length_head
    assert head is not None and was is not None and head.cfg.prediction_width == 0
    for name, tensor in was.state_dict().items():
        assert torch.equal(tensor, head.state_dict()[name]) == name.startswith("eos."), name

    examples = read_all(setup["data"], fitted, template=None, split="train", eval_fraction=None, limit=None).examples
    feats = extract_features(fitted, examples, 0, batch_size=3, progress=False)
    assert feats.canvas.shape[1] == 0
    assert score_head(head, feats, list(range(len(feats))), 16)["bucket_acc"] >= 0.9  # it learned the lengths
    readings = read_lengths(fitted, examples, head.cfg.max_len, batch_size=5, progress=False)
    assert readings.bucket_pass[0] == 0 and readings.width == head.cfg.max_len  # the EOS head keeps the canvas
    tok = fitted.tokenizer
    prompts = [torch.tensor(e.prompt_ids) for e in examples]
    prediction = predict_budgets(fitted.model, prompts, PredictedLength(0.5), mask_id=tok.mask_id, pad_id=tok.pad_id,
                                 batch_size=4)
    assert prediction.eos_bounds == [] and max(prediction.forward_tokens) == max(len(p) for p in prompts)
    for i in range(len(examples)):
        with torch.no_grad():
            probs = head.read(*feats.batch([i, (i + 5) % len(examples)])).bucket_probs()[0].numpy()
        torch.testing.assert_close(probs, readings.bucket[i], atol=1e-5, rtol=1e-4)
    _, ours = predicted_budgets(readings, "bucket-head", 0.5)
    assert ours == prediction.budgets and len(set(ours)) > 1
    with pytest.raises(GenerationError, match="predicted:0.5:bucket"):
        predict_budgets(fitted.model, prompts, PredictedLength(0.5, "eos"), mask_id=tok.mask_id, pad_id=tok.pad_id)
    # the benchmark charges the bucket head its prompt-only pass: no canvas positions, the prompts' tokens
    report = evaluate_length(setup["data"], fitted, q=0.5, fixed=(32,), limit=6, run_generation=True, progress=False)
    methods = {m.name: m for m in report.methods}
    bucket, eos = methods["bucket-head"], methods["eos-head"]
    assert bucket.prediction_tokens == 0 and eos.prediction_tokens == 6 * head.cfg.max_len
    assert bucket.generation is not None and eos.generation is not None and methods["oracle"].generation is not None
    unpredicted = replace(bucket, predicted=False, generation=None)  # the same budgets with no prediction pass
    six = read_all(setup["data"], fitted, template=None, split="all", eval_fraction=None, limit=6).examples
    measure_generation(fitted, six, unpredicted, steps_per_token=1.0, batch_size=8,
                       block_length=None, seed=0, synthetic=report.synthetic, progress=False)
    assert unpredicted.generation is not None
    prompt_tokens = sum(len(e.prompt_ids) for e in six)
    assert bucket.generation["forward_tokens"] - unpredicted.generation["forward_tokens"] == prompt_tokens
    assert bucket.generation["canvas_tokens"] == unpredicted.generation["canvas_tokens"]


def test_a_diverging_fit_returns_the_head_it_started_from(cached: tuple[LengthHead, HeadFeatures]) -> None:
    head, feats = cached
    result = fit_length_head(head, feats, epochs=5, lr=50.0, weight_decay=0.0, val_fraction=0.25, patience=5,
                             progress=False)
    assert result.best_epoch == {"eos": 0, "bucket": 0}
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, result.state[name]), name


def _same_batches(got: Any, want: HeadFeatures) -> None:
    """``got`` reads the same states as ``want``, entry for entry (padding beside other prompt lengths included)."""
    assert len(got) == len(want) and torch.equal(got.lengths, want.lengths) and got.keys == want.keys
    index = list(range(len(want)))
    for a, b in zip(got.batch(index), want.batch(index)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cache_round_trip_and_stale_cache(setup: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_for_generation(setup["head"], device="cpu")
    examples = read_all(setup["data"], loaded, template=None, split="all", eval_fraction=None, limit=8).examples
    feats = extract_features(loaded, examples, 32, progress=False)
    feats.fingerprint = "weights A"
    store = StateCache(tmp_path / "states", "weights A")
    store.append(feats)
    back = StateCache(tmp_path / "states", "weights A").features(feats.keys[::-1], feats.sources[::-1])
    assert back.keys == [example_key(e) for e in examples][::-1] and back.sources == feats.sources[::-1]
    reverse = HeadFeatures(feats.prompts[::-1], feats.canvas.flip(0), feats.lengths.flip(0), feats.sources[::-1],
                           feats.keys[::-1])
    _same_batches(back, reverse)
    assert torch.equal(back.batch([0])[2], feats.canvas[-1:])  # bit for bit, not just close
    with pytest.raises(StateCacheError, match="other weights or another canvas"):
        StateCache(tmp_path / "states", "weights B")
    (tmp_path / "one.safetensors").write_bytes(b"")
    with pytest.raises(StateCacheError, match="is a file; the state cache is a directory"):
        StateCache(tmp_path / "one.safetensors", "weights A")


def test_cache_grows_and_computes_only_what_it_lacks(setup: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_for_generation(setup["head"], device="cpu")
    examples = read_all(setup["data"], loaded, template=None, split="all", eval_fraction=None, limit=None).examples
    computed: list[int] = []
    real = head_fit.extract_features

    def counting(loaded_: Any, chosen: Any, *args: Any, **kwargs: Any) -> HeadFeatures:
        computed.append(len(chosen))
        return real(loaded_, chosen, *args, **kwargs)

    monkeypatch.setattr(head_fit, "extract_features", counting)
    cache = tmp_path / "states"
    first = cached_features(loaded, examples[:10], 32, cache, progress=False)
    grown = cached_features(loaded, examples[5:20], 32, cache, progress=False)  # 5 held, 10 new
    shards = sorted(cache.iterdir())
    again = cached_features(loaded, examples[:20], 32, cache, progress=False)  # all held
    assert computed == [10, 10]  # the third call ran no backbone pass at all
    assert sorted(cache.iterdir()) == shards and len(shards) == 2  # growing added a shard, rewrote none
    direct = real(loaded, examples[:20], 32, progress=False)
    for got, lo in ((first, 0), (grown, 5), (again, 0)):
        part = HeadFeatures(direct.prompts[lo : lo + len(got)], direct.canvas[lo : lo + len(got)],
                            direct.lengths[lo : lo + len(got)], direct.sources[lo : lo + len(got)],
                            direct.keys[lo : lo + len(got)])
        _same_batches(got, part)


def test_an_interrupted_extraction_keeps_its_finished_shards(setup: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill in the middle of an extraction costs the chunk in flight, not the hour before it."""
    loaded = load_for_generation(setup["head"], device="cpu")
    examples = read_all(setup["data"], loaded, template=None, split="all", eval_fraction=None, limit=None).examples
    real = head_fit.extract_features
    calls: list[int] = []

    def dies_on_the_third_chunk(loaded_: Any, chosen: Any, *args: Any, **kwargs: Any) -> HeadFeatures:
        calls.append(len(chosen))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(loaded_, chosen, *args, **kwargs)

    monkeypatch.setattr(head_fit, "extract_features", dies_on_the_third_chunk)
    cache = tmp_path / "states"
    with pytest.raises(KeyboardInterrupt):
        cached_features(loaded, examples[:20], 32, cache, progress=False, shard_examples=6)
    assert len(list(cache.glob("*.safetensors"))) == 2 and not list(cache.glob("*.tmp"))
    calls.clear()
    monkeypatch.setattr(head_fit, "extract_features", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    feats = cached_features(loaded, examples[:20], 32, cache, progress=False, shard_examples=6)
    assert calls == [6, 2]  # 12 were kept; only the other 8 ran
    _same_batches(feats, real(loaded, examples[:20], 32, progress=False))


def test_refusals(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["fit-head", "--data", str(setup["data"]), "--device", "cpu"]
    assert main([*base, "--model", str(setup["plain"]), "--out", str(tmp_path / "a")]) == 2
    assert "has no length head to fit" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main([*base, "--model", str(setup["head"]), "--out", str(full)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (full / "keep.txt").read_text() == "mine"
    assert main([*base, "--model", str(setup["head"]), "--out", str(tmp_path / "b"), "--epochs", "0"]) == 2
    assert "fit settings out of range" in capsys.readouterr().err
    with pytest.raises(HeadFitError, match="too few to fit"):
        fit_head(setup["head"], [str(setup["data"])], tmp_path / "c", limit=1, device="cpu", progress=False,
                 val_fraction=0.5)


@pytest.mark.gpu
def test_backbone_on_cuda_fit_on_cpu(setup: dict[str, Path], tmp_path: Path) -> None:
    """The backbone runs on the GPU, the cache and the fit stay on the CPU, and the fitted head equals the
    one the same fit makes from CPU states (up to the two devices' rounding)."""
    settings: dict[str, Any] = {"progress": False, "epochs": 20, "lr": 1e-2, "val_fraction": 0.0}  # keep the last
    fit_head(setup["head"], [str(setup["data"])], tmp_path / "gpu", device="cuda", **settings)
    fit_head(setup["head"], [str(setup["data"])], tmp_path / "cpu", device="cpu", **settings)
    gpu, cpu = load_file(tmp_path / "gpu" / "model.safetensors"), load_file(tmp_path / "cpu" / "model.safetensors")
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], atol=1e-3, rtol=1e-3)

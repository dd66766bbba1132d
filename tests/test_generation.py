"""Generation: budgets (parsing, rounding, prediction, extension), stop at EOS and LLaDA's EOS options,
per-sample cost accounting, left padding, loading a run and the CLI. Parity with LLaDA's reference sampler is
``tests/test_llada_sampler_parity.py``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_model
from torch import Tensor, nn

from dlm.cli import main
from dlm.errors import GenerationError
from dlm.generation import (
    FixedLength,
    PredictedLength,
    StepRecord,
    block_schedule,
    budget_from_bound,
    extend_budget,
    generate,
    eot_id_of,
    generate_text,
    load_for_generation,
    next_power_of_two,
    parse_length,
)
from dlm.modeling import DiffusionTransformer, LengthHead, LengthHeadConfig, build_model, preset

VOCAB, MASK, EOS = 64, 63, 62

# ================================================================================ helpers


def tiny_model(seed: int = 0, **overrides: Any) -> DiffusionTransformer:
    """A random LLaDA-family model over a 64-token vocabulary; init_std 0.5 makes its distributions peaked."""
    torch.manual_seed(seed)
    base: dict[str, Any] = dict(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=256, init_std=0.5
    )
    return build_model(preset("tiny", **{**base, **overrides})).eval()


def recorder() -> tuple[dict[int, list[StepRecord]], Any]:
    records: dict[int, list[StepRecord]] = defaultdict(list)
    return records, lambda r: records[r.sample].append(r)


class Scripted(nn.Module):
    """A fake denoiser whose hidden states are its logits.

    At canvas position ``i`` (row position minus ``prompt_len``) it proposes answer token ``1 + i % 10`` for
    ``i < eos_at`` and EOS from ``eos_at`` on (never EOS when ``eos_at`` is None). Confidence falls along the
    canvas, so the answer commits left to right; ``eos_logit`` sets how confident the EOS proposals are.
    """

    def __init__(self, prompt_len: int, eos_at: int | None, eos_logit: float = 4.0) -> None:
        super().__init__()
        self.prompt_len, self.eos_at, self.eos_logit = prompt_len, eos_at, eos_logit
        self.anchor = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[int, int]] = []

    def forward(self, input_ids: Tensor, doc_ids: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        b, t = input_ids.shape
        self.calls.append((b, t))
        pos = position_ids if position_ids is not None else torch.arange(t).expand(b, t)
        rel = (pos - self.prompt_len).clamp(min=0)
        logits = torch.zeros(b, t, VOCAB)
        answer = rel < (self.eos_at if self.eos_at is not None else 10**9)
        token = torch.where(answer, 1 + rel % 10, torch.full_like(rel, EOS))
        peak = torch.where(answer, 8.0 - 0.05 * rel, self.eos_logit - 0.05 * rel)
        logits.scatter_(2, token[..., None], peak[..., None].float())
        return logits

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden


# ================================================================================ batching and seeds


def test_left_padded_batch_matches_each_prompt_alone() -> None:
    model = tiny_model(seed=4)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 11], [6]]
    batch = generate(model, prompts, mask_id=MASK, eos_id=EOS, length=16, stop_at_eos=False)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], mask_id=MASK, eos_id=EOS, length=16, stop_at_eos=False)
        assert batch.canvases[i] == alone.canvases[0]
    # padding is real compute and is charged: every row of the batch ran 7 + 16 columns per step
    assert batch.forward_tokens == [16 * (7 + 16)] * 3 and batch.canvas_tokens == [16 * 16] * 3


def test_padded_prompt_tensor_with_mask_equals_lists() -> None:
    model = tiny_model(seed=4)
    padded = torch.tensor([[0, 0, 5, 9, 2], [7, 1, 4, 4, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    a = generate(model, padded, prompt_mask=mask, mask_id=MASK, eos_id=EOS, length=16, stop_at_eos=False)
    b = generate(model, [[5, 9, 2], [7, 1, 4, 4, 8]], mask_id=MASK, eos_id=EOS, length=16, stop_at_eos=False)
    assert a.canvases == b.canvases and a.prompts == b.prompts


def test_seed_makes_sampling_reproducible() -> None:
    model = tiny_model()
    kwargs: dict[str, Any] = dict(mask_id=MASK, eos_id=EOS, length=16, temperature=1.0, seed=11)
    assert generate(model, [[1, 2, 3]], **kwargs).canvases == generate(model, [[1, 2, 3]], **kwargs).canvases
    other = generate(model, [[1, 2, 3]], **{**kwargs, "seed": 12}).canvases
    assert other != generate(model, [[1, 2, 3]], **kwargs).canvases


# ================================================================================ stop at EOS


def test_stops_once_eos_is_committed_with_everything_before_it() -> None:
    model = Scripted(prompt_len=4, eos_at=5, eos_logit=4.0)  # answer more confident than EOS
    records, on_step = recorder()
    result = generate(model, [[1, 2, 3, 4]], mask_id=MASK, eos_id=EOS, length=32, on_step=on_step)
    assert result.answers == [[1, 2, 3, 4, 5]]
    assert result.finished == [True]
    assert result.canvases[0] == [1, 2, 3, 4, 5] + [EOS] * 27
    # five answer tokens, then the EOS at position 5: done after 6 of the 32 planned steps
    assert result.steps == [6] and len(model.calls) == 6
    assert [r.positions for r in records[0]] == [[0], [1], [2], [3], [4], [5]]
    assert result.forward_tokens == [6 * (4 + 32)]


def test_an_eos_with_open_positions_before_it_does_not_stop() -> None:
    model = Scripted(prompt_len=4, eos_at=5, eos_logit=12.0)  # EOS proposals commit first
    result = generate(model, [[1, 2, 3, 4]], mask_id=MASK, eos_id=EOS, length=32)
    assert result.answers == [[1, 2, 3, 4, 5]] and result.finished == [True]
    assert result.steps == [32]  # the tail of EOS commits first; the answer positions are still open until the end


def test_confidence_eos_eot_inf_commits_the_answer_before_its_eos() -> None:
    model = Scripted(prompt_len=4, eos_at=5, eos_logit=12.0)  # as above: EOS proposals are the most confident
    records, on_step = recorder()
    result = generate(model, [[1, 2, 3, 4]], mask_id=MASK, eos_id=EOS, length=32, confidence_eos_eot_inf=True,
                      on_step=on_step)
    # their confidence is 0 now: the answer commits first, left to right, and only then the EOS proposals
    assert [r.positions for r in records[0][:5]] == [[0], [1], [2], [3], [4]]
    assert all(r.tokens == [EOS] for r in records[0][5:]) and len(records[0]) > 5
    assert result.answers == [[1, 2, 3, 4, 5]] and result.finished == [True]


def test_logits_eos_inf_never_proposes_eos() -> None:
    result = generate(Scripted(prompt_len=4, eos_at=5), [[1, 2, 3, 4]], mask_id=MASK, eos_id=EOS, length=16,
                      logits_eos_inf=True)
    # where the model wants EOS, every other logit is 0 and the argmax is token 0
    assert result.canvases == [[1, 2, 3, 4, 5] + [0] * 11] and result.finished == [False]


def test_finished_samples_leave_the_batch() -> None:
    model = Scripted(prompt_len=2, eos_at=3)
    result = generate(model, [[1, 2], [3, 4]], mask_id=MASK, eos_id=EOS, length=[16, 16])
    assert result.answers == [[1, 2, 3], [1, 2, 3]] and result.steps == [4, 4]
    assert model.calls == [(2, 18)] * 4


# ================================================================================ budgets


def test_parse_length() -> None:
    assert parse_length("fixed:256") == FixedLength(256)
    assert parse_length("predicted") == PredictedLength(0.9, "bucket")
    assert parse_length("predicted:0.8") == PredictedLength(0.8, "bucket")
    assert parse_length("predicted:0.95:eos") == PredictedLength(0.95, "eos")
    assert parse_length("predicted:1:max") == PredictedLength(1.0, "max")
    assert parse_length(FixedLength(3)) == FixedLength(3)
    assert str(parse_length("predicted:0.9")) == "predicted:0.9:bucket"


@pytest.mark.parametrize(
    "bad", ["", "fixed", "fixed:", "fixed:0", "fixed:-4", "fixed:abc", "fixed:1.5", "predicted:0", "predicted:1.5",
            "predicted:x", "predicted:0.9:median", "auto", "256"]
)
def test_parse_length_rejects_bad_specs(bad: str) -> None:
    with pytest.raises(GenerationError, match=r"fixed:N .*predicted"):
        parse_length(bad)


def test_power_of_two_budgets() -> None:
    assert [next_power_of_two(n) for n in (0, 1, 2, 3, 16, 17, 1000)] == [1, 1, 2, 4, 16, 32, 1024]
    with pytest.raises(ValueError):
        next_power_of_two(-1)
    assert [budget_from_bound(b, 16, 256) for b in (0, 3, 16, 17, 100, 256, 5000)] == [16, 16, 16, 32, 128, 256, 256]
    assert [extend_budget(c, 64) for c in (16, 24, 32, 48, 64, 100)] == [32, 32, 64, 64, None, None]
    assert extend_budget(32, 48) == 48


def test_block_schedule() -> None:
    assert block_schedule(0, 16, 16, None) == ((0, 16, 16),)
    assert block_schedule(0, 16, 8, 4) == ((0, 4, 2), (4, 8, 2), (8, 12, 2), (12, 16, 2))
    assert block_schedule(16, 32, 64, None) == ((16, 32, 16),)  # never more steps than positions
    assert block_schedule(0, 20, 10, 8) == ((0, 8, 4), (8, 16, 4), (16, 20, 2))


def test_canvas_without_eos_extends_to_the_next_power_of_two_and_stops_at_max() -> None:
    model = Scripted(prompt_len=3, eos_at=None)
    result = generate(model, [[1, 2, 3]], mask_id=MASK, eos_id=EOS, length=[16], extend=True, max_length=64)
    assert result.budgets == [16] and result.canvas_lengths == [64] and result.finished == [False]
    assert result.answers[0] == [1 + i % 10 for i in range(64)]
    assert result.steps == [16 + 16 + 32]
    assert [t for _, t in model.calls] == [3 + 16] * 16 + [3 + 32] * 16 + [3 + 64] * 32
    assert result.forward_tokens == [16 * 19 + 16 * 35 + 32 * 67]


def test_extension_keeps_the_steps_per_token_rate_and_stops_at_eos() -> None:
    model = Scripted(prompt_len=3, eos_at=40)
    result = generate(model, [[1, 2, 3]], mask_id=MASK, eos_id=EOS, length=[16], steps=8, extend=True,
                      max_length=128)
    assert result.canvas_lengths == [64] and result.finished == [True]
    assert result.answers[0] == [1 + i % 10 for i in range(40)]
    # 2 tokens per step: 16 positions in 8 steps, 16 more in 8, then in the 32-token tail positions 32..39 take
    # 4 steps and the 5th commits the EOS at 40 (and 41), which ends the sample 11 steps before its plan does
    assert [t for _, t in model.calls] == [19] * 8 + [35] * 8 + [67] * 5
    assert result.steps == [21]


def test_fixed_canvas_does_not_extend_by_default() -> None:
    result = generate(Scripted(prompt_len=3, eos_at=None), [[1, 2, 3]], mask_id=MASK, eos_id=EOS, length="fixed:16")
    assert result.canvas_lengths == [16] and result.finished == [False] and len(result.answers[0]) == 16


def test_each_sample_pays_for_its_own_canvas() -> None:
    model = Scripted(prompt_len=2, eos_at=None)
    result = generate(model, [[1, 2], [3, 4]], mask_id=MASK, eos_id=EOS, length=[16, 64])
    assert result.steps == [16, 64]
    assert result.forward_tokens == [16 * (2 + 16), 64 * (2 + 64)]
    assert result.canvas_tokens == [16 * 16, 64 * 64]
    assert sorted(set(model.calls)) == [(1, 18), (1, 66)]


def test_guidance_doubles_the_cost() -> None:
    result = generate(tiny_model(), [[1, 2, 3]], mask_id=MASK, eos_id=EOS, length=16, cfg_scale=1.0,
                      stop_at_eos=False)
    assert result.forward_tokens == [16 * 2 * (3 + 16)] and result.canvas_tokens == [16 * 2 * 16]


def _with_head(model: nn.Module, d_model: int, cfg: LengthHeadConfig) -> nn.Module:
    model.length_head = LengthHead(d_model, cfg)
    return model


def test_predicted_budget_from_the_bucket_head_then_extension() -> None:
    model = _with_head(Scripted(prompt_len=3, eos_at=None), VOCAB, LengthHeadConfig(max_len=64))
    with torch.no_grad():
        model.length_head.bucket.out.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # P(16) ≈ 0.99
    result = generate(model, [[1, 2, 3]], mask_id=MASK, eos_id=EOS, length="predicted:0.9")
    assert result.bounds == [16] and result.budgets == [16]
    assert result.prediction_tokens == [3 + 64]  # one pass over [prompt, max_len masks], charged to the sample
    assert result.canvas_lengths == [64] and result.finished == [False]  # never an EOS: 16 -> 32 -> 64 (the max)
    assert result.forward_passes == 1 + 64
    assert result.total_forward_tokens == 67 + 16 * 19 + 16 * 35 + 32 * 67


def test_predicted_budget_from_the_eos_head() -> None:
    model = _with_head(Scripted(prompt_len=3, eos_at=5), VOCAB, LengthHeadConfig(max_len=64))
    with torch.no_grad():  # past the end from canvas position 5 on, from the EOS proposals' logits
        model.length_head.eos.out.weight.zero_()
        model.length_head.eos.out.weight[0, EOS] = 10.0
        model.length_head.eos.out.bias.fill_(-5.0)
    result = generate(model, [[1, 2, 3]], mask_id=MASK, eos_id=EOS, length="predicted:0.9:eos")
    assert result.bounds == [5] and result.budgets == [16]
    assert result.answers == [[1, 2, 3, 4, 5]] and result.finished == [True]


def test_predicted_budget_without_a_head_is_a_clear_error() -> None:
    with pytest.raises(GenerationError, match="fixed:N"):
        generate(tiny_model(), [[1, 2]], mask_id=MASK, eos_id=EOS, length="predicted")


def test_real_model_with_head_predicts_budgets() -> None:
    model = tiny_model(length_head=LengthHeadConfig(max_len=64))
    result = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], mask_id=MASK, eos_id=EOS, length="predicted:0.5")
    # a fresh head is uniform over 16/32/64: the 0.5-quantile is the 32 bucket
    assert result.bounds == [32, 32] and result.budgets == [32, 32]
    assert all(c in (32, 64) for c in result.canvas_lengths)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(steps=0), "steps"),
        (dict(temperature=-1.0), "temperature"),
        (dict(cfg_scale=-0.5), "cfg_scale"),
        (dict(remasking="entropy"), "remasking"),
        (dict(block_length=0), "block_length"),
        (dict(eos_id=MASK), "differ"),
        (dict(length=[16, 16]), "budgets for 1 prompts"),
        (dict(length=0), "at least 1"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    call: dict[str, Any] = dict(mask_id=MASK, eos_id=EOS, length=16)
    with pytest.raises(GenerationError, match=message):
        generate(tiny_model(), [[1, 2]], **{**call, **kwargs})


# ================================================================================ canvases and max_seq_len


@pytest.mark.parametrize(("positions", "kwargs"), [
    ("rope", dict(length="fixed:300")),
    ("learned", dict(length="fixed:300")),
    ("rope", dict(length=[16], extend=True, max_length=512)),  # an extension may not grow past it either
])
def test_a_canvas_above_max_seq_len_is_refused(positions: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(GenerationError, match=r"canvas of \d+ positions exceeds this model's max_seq_len 256"):
        generate(tiny_model(positions=positions), [[1, 2]], mask_id=MASK, eos_id=EOS, steps=1, **kwargs)


def test_prompt_plus_canvas_past_max_seq_len() -> None:
    prompt = list(range(20))  # 20 + 240 = 260 positions, 256 in the model
    with pytest.raises(GenerationError, match="learned positions stop at 256"):
        generate(tiny_model(positions="learned"), [prompt], mask_id=MASK, eos_id=EOS, length=240, steps=1)
    headed = tiny_model(positions="learned", max_seq_len=64, length_head=LengthHeadConfig(max_len=64))
    with pytest.raises(GenerationError, match="reaches 66 tokens but this model's learned positions stop at 64"):
        generate(headed, [[1, 2]], mask_id=MASK, eos_id=EOS, length="predicted")  # before the prediction pass
    # rotary positions extend past max_seq_len: the canvas itself fits, so a long prompt is the user's call
    result = generate(tiny_model(), [prompt], mask_id=MASK, eos_id=EOS, length=240, steps=2, stop_at_eos=False)
    assert result.canvas_lengths == [240] and result.forward_tokens == [2 * 260]


# ================================================================================ loading and the CLI


def _write_run(run_dir: Path, *, head: bool = False, sft: bool = True) -> DiffusionTransformer:
    cfg = preset("tiny", n_layers=1, max_seq_len=512, length_head=LengthHeadConfig(max_len=32) if head else None)
    torch.manual_seed(0)
    model = build_model(cfg)
    run_dir.mkdir(parents=True)
    save_model(model, str(run_dir / "model.safetensors"))
    (run_dir / "model_config.json").write_text(cfg.model_dump_json())
    data = {"format": "sft", "sft_template": "plain"} if sft else {"format": "pretrain-packed"}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"tokenizer": {"name_or_path": "gpt2-mdm"}, "data": data}))
    return model


def test_load_for_generation_restores_the_run(tmp_path: Path) -> None:
    original = _write_run(tmp_path / "run", head=True)
    loaded = load_for_generation(tmp_path / "run", device="cpu")
    assert loaded.template == "plain" and loaded.tokenizer.mask_id == 50257 and loaded.tokenizer.eos_id == 50256
    state = loaded.model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in original.state_dict().items())
    assert loaded.model.length_head is not None
    texts, result = generate_text(loaded, ["Name a colour."], length="fixed:16", steps=4)
    assert len(texts) == 1 and result.steps[0] <= 4
    # the plain SFT template ends the prompt with the blank line training put before the answer
    assert loaded.tokenizer.tokenizer.decode(result.prompts[0]) == "Name a colour.\n\n"


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "run", sft=False)
    argv = ["generate", str(tmp_path / "run"), "--prompt", "Once upon", "--prompt", "The", "--length", "fixed:16",
            "--steps", "4", "--block-length", "8", "--temperature", "0.5", "--cfg-scale", "0.5", "--device", "cpu",
            "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["length"] == "fixed:16" and [s["prompt"] for s in out["samples"]] == ["Once upon", "The"]
    assert all(s["budget"] == 16 and s["steps"] <= 4 for s in out["samples"])
    assert out["total_forward_tokens"] == sum(s["forward_tokens"] for s in out["samples"])

    assert main(["generate", str(tmp_path / "run"), "--prompt", "Hi", "--length", "fixed:16", "--steps", "2",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "forward tokens" in captured.err and "fixed:16" in captured.err


def test_cli_generate_passes_llada_s_sampler_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_run(tmp_path / "run", sft=False)
    seen: list[dict[str, Any]] = []

    def spy(loaded: Any, prompts: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return generate_text(loaded, prompts, **kwargs)

    monkeypatch.setattr("dlm.generation.generate_text", spy)
    argv = ["generate", str(tmp_path / "run"), "--prompt", "Once", "--length", "fixed:8", "--steps", "2",
            "--device", "cpu", "--json"]
    assert main(argv + ["--logits-eos-inf", "--confidence-eos-eot-inf", "--confidence-dtype", "fp64"]) == 0
    assert main(argv) == 0
    capsys.readouterr()
    flags = ("logits_eos_inf", "confidence_eos_eot_inf", "confidence_dtype")
    assert [tuple(k[f] for f in flags) for k in seen] == [(True, True, torch.float64), (False, False, None)]


def test_eot_id_is_the_tokenizers_end_of_turn_token(tmp_path: Path) -> None:
    _write_run(tmp_path / "run")
    tok = load_for_generation(tmp_path / "run", device="cpu").tokenizer
    assert eot_id_of(tok) is None  # GPT-2's vocabulary has no <|eot_id|>
    tok.tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    assert eot_id_of(tok) == len(tok.tokenizer) - 1


def test_cli_generate_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "run")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Hi", "--length", "fixed:zero", "--device", "cpu"]) == 2
    assert "allowed: fixed:N" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Hi", "--length", "predicted", "--device", "cpu"]) == 2
    assert "length head" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "Hi"]) == 2
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Hi", "--length", "fixed:4096", "--device", "cpu"]) == 2
    assert "canvas of 4096 positions exceeds this model's max_seq_len 512" in capsys.readouterr().err


def test_max_length_caps_predicted_budgets() -> None:
    model = _with_head(Scripted(prompt_len=3, eos_at=None), VOCAB, LengthHeadConfig(max_len=64))
    with torch.no_grad():
        model.length_head.bucket.out.bias.copy_(torch.tensor([0.0, 0.0, 9.0]))  # the 64 bucket
    result = generate(model, [[1, 2, 3]], mask_id=MASK, eos_id=EOS, length="predicted", max_length=32)
    assert result.bounds == [64] and result.budgets == [32] and result.canvas_lengths == [32]

"""The sampler against LLaDA's reference ``generate()``, step by step: fp32 and bf16 logits, float64 confidence
(LLaDA's earlier release) as an option, more steps than positions with noise, and the EOS/EOT options."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.errors import GenerationError
from dlm.generation import GenerationResult, StepRecord, generate, num_transfer_tokens
from tests.test_generation import EOS, MASK, recorder, tiny_model

EOT = 61  # stands for LLaDA's <|eot_id|> (126348) in the 64-token test vocabulary; EOS stands for 126081
History = list[list[tuple[list[int], list[int]]]]

# ================================================================================ the reference (LLaDA)
# A transcription of GSAI-ML/LLaDA's generate.py as published with logits_eos_inf / confidence_eos_eot_inf,
# changed only to: draw its noise from an explicit generator (torch.rand of the same shapes, what rand_like
# draws), call our model's forward + logits, take the EOS/EOT ids as arguments (126081 / 126348 there), record
# what each step commits, and (softmax_dtype) emulate the earlier release whose softmax cast to float64.


def ref_add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def ref_get_num_transfer_tokens(mask_index: Tensor, steps: int) -> Tensor:
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def ref_generate(
    model: Any, prompt: Tensor, steps: int, gen_length: int, block_length: int, temperature: float,
    cfg_scale: float, remasking: str, mask_id: int, generator: torch.Generator | None, *,
    logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False, eos_id: int = EOS, eot_id: int = EOT,
    softmax_dtype: torch.dtype | None = None,
) -> tuple[Tensor, History]:
    """LLaDA's sampler; also returns, per step, per row, the committed (canvas positions, tokens)."""
    history: History = []
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        block_mask_index = (
            x[:, prompt.shape[1] + num_block * block_length : prompt.shape[1] + (num_block + 1) * block_length]
            == mask_id
        )
        num_transfer_tokens = ref_get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                logits = model.logits(model(x_))
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model.logits(model(x))
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            logits_with_noise = ref_add_gumbel_noise(logits, temperature=temperature, generator=generator)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:
                logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                p = F.softmax(logits if softmax_dtype is None else logits.to(softmax_dtype), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), generator=generator)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
            step = []
            for j in range(x.shape[0]):
                cols = transfer_index[j].nonzero().flatten()
                step.append(((cols - prompt.shape[1]).tolist(), x[j, cols].tolist()))
            history.append(step)
    return x, history


# ================================================================================ helpers


class LladaLogits(nn.Module):
    """A dlm model whose logits come out as LLaDA's forward returns them: in ``dtype`` (bf16 for a bf16 LLaDA),
    after an optional ``boost`` added to chosen token columns (to make EOS/EOT proposals frequent)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, boost: dict[int, float] | None = None) -> None:
        super().__init__()
        self.model, self.dtype, self.boost = model, dtype, boost or {}

    def forward(self, input_ids: Tensor, doc_ids: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        return self.model(input_ids, doc_ids=doc_ids, position_ids=position_ids)  # type: ignore[no-any-return]

    def logits(self, hidden: Tensor) -> Tensor:
        out = self.model.logits(hidden)  # type: ignore[operator]
        for token, value in self.boost.items():
            out[..., token] += value
        return out.to(self.dtype)  # type: ignore[no-any-return]


def per_sample(history: History, row: int) -> list[tuple[list[int], list[int]]]:
    return [step[row] for step in history]


def prompts_of(seed: int, rows: int = 3, width: int = 6) -> Tensor:
    return torch.randint(0, EOT, (rows, width), generator=torch.Generator().manual_seed(seed))


def run_both(
    model: nn.Module, prompts: Tensor, *, gen_length: int, block_length: int, steps: int, temperature: float,
    cfg_scale: float, remasking: str, ref_options: dict[str, Any] | None = None, **ours: Any,
) -> tuple[Tensor, History, GenerationResult, dict[int, list[StepRecord]]]:
    """The reference and our sampler from the same seed: (reference x, its history, our result, our records)."""
    ref_x, history = ref_generate(
        model, prompts, steps, gen_length, block_length, temperature, cfg_scale, remasking, MASK,
        torch.Generator().manual_seed(7), **(ref_options or {}),
    )
    records, on_step = recorder()
    result = generate(
        model, prompts, mask_id=MASK, eos_id=EOS, length=gen_length, steps=steps,
        block_length=block_length if block_length != gen_length else None, temperature=temperature,
        cfg_scale=cfg_scale, remasking=remasking, generator=torch.Generator().manual_seed(7), stop_at_eos=False,
        on_step=on_step, **ours,
    )
    return ref_x, history, result, records


def assert_same_steps(prompts: Tensor, ref_x: Tensor, history: History, result: GenerationResult,
                      records: dict[int, list[StepRecord]]) -> None:
    """Every row commits what the reference commits at every step that commits anything, and ends the same."""
    for row in range(prompts.shape[0]):
        reference = [s for s in per_sample(history, row) if s[0]]
        assert [(r.positions, r.tokens) for r in records[row]] == reference, f"row {row} diverged from LLaDA"
        assert result.canvases[row] == ref_x[row, prompts.shape[1] :].tolist()


# ================================================================================ parity step by step

PARITY_CASES = [
    # (gen_length, block_length, steps, temperature, cfg_scale, remasking)
    (16, 16, 16, 0.0, 0.0, "low_confidence"),   # one token per step, one block
    (16, 16, 5, 0.0, 0.0, "low_confidence"),    # uneven plan: 4, 3, 3, 3, 3
    (16, 8, 8, 0.0, 0.0, "low_confidence"),     # two semi-AR blocks, two tokens per step
    (16, 4, 8, 0.0, 0.0, "low_confidence"),     # four blocks
    (16, 8, 16, 0.0, 1.5, "low_confidence"),    # classifier-free guidance
    (16, 16, 16, 1.0, 0.0, "low_confidence"),   # Gumbel noise
    (16, 4, 8, 0.7, 0.5, "low_confidence"),     # noise + guidance + blocks
    (16, 16, 8, 0.0, 0.0, "random"),            # random remasking
    (16, 8, 8, 1.0, 1.0, "random"),             # random remasking with noise and guidance
    (32, 32, 8, 0.0, 0.0, "low_confidence"),    # four tokens per step: many bf16 ties to break
]


def llada_like(variant: str) -> nn.Module:
    """``fp32``; ``bf16``: fp32 weights, logits cast to bf16 as a bf16 LLaDA returns them; ``bf16-flat``: the same
    with small weights, so probabilities are close and bf16 rounds many to the same value (LLaDA's 126k-token
    softmax is as flat); ``bf16-model-flat``: the whole model in bf16."""
    if variant == "fp32":
        return LladaLogits(tiny_model(), torch.float32)
    if variant == "bf16":
        return LladaLogits(tiny_model(), torch.bfloat16)
    if variant == "bf16-flat":
        return LladaLogits(tiny_model(init_std=0.02), torch.bfloat16)
    return tiny_model(init_std=0.02).to(torch.bfloat16)


VARIANTS = ["fp32", "bf16", "bf16-flat", "bf16-model-flat"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("gen_length", "block_length", "steps", "temperature", "cfg_scale", "remasking"), PARITY_CASES)
def test_commits_match_llada_reference_step_by_step(
    variant: str, gen_length: int, block_length: int, steps: int, temperature: float, cfg_scale: float,
    remasking: str,
) -> None:
    model = llada_like(variant)
    prompts = prompts_of(1)
    ref_x, history, result, records = run_both(
        model, prompts, gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
        cfg_scale=cfg_scale, remasking=remasking,
    )
    assert_same_steps(prompts, ref_x, history, result, records)
    assert all(len(records[row]) == steps for row in range(prompts.shape[0]))
    assert result.steps == [steps] * prompts.shape[0] and result.forward_passes == steps


def test_float64_confidence_is_llada_s_earlier_softmax_and_ranks_bf16_differently() -> None:
    """``confidence_dtype=torch.float64`` reproduces the release whose softmax cast to float64; on flat bf16 logits
    that ranking is not the current reference's, which is why the default now follows the logits' dtype."""
    model = llada_like("bf16-flat")
    prompts = prompts_of(1)
    setting: dict[str, Any] = dict(gen_length=16, block_length=16, steps=16, temperature=0.0, cfg_scale=0.0,
                                   remasking="low_confidence")
    ref_x, history, result, records = run_both(model, prompts, **setting, confidence_dtype=torch.float64,
                                               ref_options=dict(softmax_dtype=torch.float64))
    assert_same_steps(prompts, ref_x, history, result, records)
    _, current = ref_generate(model, prompts, 16, 16, 16, 0.0, 0.0, "low_confidence", MASK, None)
    assert history != current


# ================================================================================ more steps than positions


@pytest.mark.parametrize(("block_length", "temperature", "remasking"),
                         [(16, 0.0, "low_confidence"), (8, 1.0, "low_confidence"), (8, 0.0, "random"),
                          (4, 0.8, "random")])
def test_more_steps_than_positions_keeps_the_random_stream(
    block_length: int, temperature: float, remasking: str
) -> None:
    """LLaDA runs the steps above a block's size as passes that commit nothing but still draw noise; the sampler
    skips their model call and draws the same noise, so the next block starts from the same random state."""
    model = llada_like("bf16")
    prompts = prompts_of(3, rows=2, width=5)
    ref_x, history, result, records = run_both(
        model, prompts, gen_length=16, block_length=block_length, steps=32, temperature=temperature, cfg_scale=0.0,
        remasking=remasking,
    )
    assert_same_steps(prompts, ref_x, history, result, records)
    assert sum(1 for step in history if step[0][0]) == 16 and len(history) == 32
    assert result.forward_passes == 16 and result.steps == [16, 16]  # the reference ran 32 passes, 16 of them empty


# ================================================================================ EOS / EOT options


@pytest.mark.parametrize(("options", "temperature"),
                         [(dict(logits_eos_inf=True), 0.0), (dict(logits_eos_inf=True), 1.0),
                          (dict(confidence_eos_eot_inf=True), 0.0),
                          (dict(logits_eos_inf=True, confidence_eos_eot_inf=True), 0.0)])
def test_eos_options_match_the_reference(options: dict[str, bool], temperature: float) -> None:
    """EOS and EOT are boosted so that the model proposes them often: each option changes what is committed, and
    our sampler commits what the reference commits with it."""
    model = LladaLogits(tiny_model(), torch.bfloat16, boost={EOS: 4.0, EOT: 4.0})
    prompts = prompts_of(5)
    setting: dict[str, Any] = dict(gen_length=16, block_length=8, steps=8, temperature=temperature, cfg_scale=0.0,
                                   remasking="low_confidence")
    ref_x, history, result, records = run_both(model, prompts, **setting, ref_options=options, eot_id=EOT, **options)
    assert_same_steps(prompts, ref_x, history, result, records)
    assert history != run_both(model, prompts, **setting)[1]
    if options.get("logits_eos_inf"):
        assert EOS not in ref_x[:, prompts.shape[1] :].tolist()


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(confidence_eos_eot_inf=True, remasking="random"), "random remasking has none"),
    (dict(confidence_dtype=torch.int64), "confidence_dtype must be a floating dtype"),
])
def test_bad_option_combinations_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        generate(tiny_model(), [[1, 2]], mask_id=MASK, eos_id=EOS, length=16, **kwargs)


def test_num_transfer_tokens_matches_reference() -> None:
    counts = torch.tensor([0, 1, 7, 16, 33])
    for steps in (1, 3, 5, 16):
        ours = num_transfer_tokens(counts, steps)
        ref = ref_get_num_transfer_tokens(torch.arange(40)[None, :] < counts[:, None], steps)
        assert torch.equal(ours, ref) and ours.sum(1).tolist() == counts.tolist()

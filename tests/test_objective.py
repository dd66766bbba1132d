"""The LLaDA objectives against a plain full-logits reference, and the statistics of the masking process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlm.modeling import DiffusionTransformer, preset
from dlm.training.objective import T_BUCKETS, diffusion_loss, forward_process, mask_generator, t_bucket

MASK_ID = 63


def _model(seed: int = 0, **overrides: object) -> DiffusionTransformer:
    torch.manual_seed(seed)
    return DiffusionTransformer(
        preset("tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, **overrides)
    )


def test_mask_rate_matches_p_mask() -> None:
    x = torch.zeros(64, 4096, dtype=torch.long)
    noised = forward_process(x, MASK_ID, mask_generator(0, 1), eps=1e-3)
    n = x.shape[1]
    rate = noised.masked.float().mean(dim=1)
    p = noised.p_mask
    z = (rate - p) * n / torch.sqrt(n * p * (1 - p))
    assert z.abs().max() < 5.0
    assert z.mean().abs() < 1.0
    assert torch.all(noised.p_mask >= 1e-3) and torch.all(noised.p_mask <= 1.0)
    assert torch.equal(noised.noisy_ids[noised.masked], torch.full_like(x[noised.masked], MASK_ID))
    assert torch.equal(noised.noisy_ids[~noised.masked], x[~noised.masked])
    # t is uniform on (0, 1): its mean over 64 draws is within a generous band of 0.5
    assert 0.35 < noised.t.mean().item() < 0.65


def test_mask_draw_is_a_pure_function_of_seed_step_rank_microstep() -> None:
    x = torch.randint(0, 60, (4, 32))
    a = forward_process(x, MASK_ID, mask_generator(7, 3, 1, 2))
    torch.rand(10)  # global RNG use in between must not matter
    b = forward_process(x, MASK_ID, mask_generator(7, 3, 1, 2))
    c = forward_process(x, MASK_ID, mask_generator(7, 3, 1, 3))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.t, b.t)
    assert not torch.equal(a.masked, c.masked)


def test_sft_never_masks_the_prompt_and_masks_the_answer_at_rate() -> None:
    x = torch.randint(0, 60, (32, 512))
    prompt_len = torch.randint(1, 256, (32,))
    prompt_mask = torch.arange(512)[None, :] < prompt_len[:, None]
    noised = forward_process(x, MASK_ID, mask_generator(0, 0), prompt_mask=prompt_mask)
    assert not (noised.masked & prompt_mask).any()
    answer = ~prompt_mask
    rate = (noised.masked & answer).sum(1).float() / answer.sum(1)
    assert (rate - noised.p_mask).abs().max() < 0.15
    assert noised.normalizer == 32.0


@pytest.mark.parametrize("output_bias", [False, True])
def test_pretrain_loss_equals_full_logits_reference(output_bias: bool) -> None:
    model = _model(output_bias=output_bias)
    if output_bias:
        with torch.no_grad():
            model.output_bias.bias.normal_()  # type: ignore[union-attr]
    x = torch.randint(0, 60, (6, 40))
    noised = forward_process(x, MASK_ID, mask_generator(1, 2), eps=1e-3)
    parts = diffusion_loss(model, noised, chunk_size=7)
    ours = parts.loss_sum / noised.normalizer
    params = [model.embed.weight] + ([model.output_bias.bias] if output_bias else [])
    grads_ours = torch.autograd.grad(ours, params)  # one backward: the fused loss allows no second one

    # LLaDA's reference: full logits, CE at masked positions divided by p_mask, summed, / (B * L).
    logits = model.logits(model(noised.noisy_ids))
    p_mask = noised.p_mask[:, None].expand_as(x)
    token_loss = F.cross_entropy(logits[noised.masked], x[noised.masked], reduction="none") / p_mask[noised.masked]
    ref = token_loss.sum() / (x.shape[0] * x.shape[1])
    grads_ref = torch.autograd.grad(ref, params)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for grad_ours, grad_ref in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)
    # The loss by noise level: each row's weighted CE lands in the bucket of its t.
    row_loss = torch.zeros(x.shape[0]).index_add_(0, noised.masked.nonzero()[:, 0], token_loss.detach())
    by_bucket = torch.zeros(len(T_BUCKETS)).index_add_(0, t_bucket(noised.t), row_loss)
    assert len(set(t_bucket(noised.t).tolist())) > 1, "the draw should spread rows over several buckets"
    torch.testing.assert_close(parts.bucket_sums, by_bucket, rtol=1e-5, atol=1e-5)
    assert parts.bucket_counts.sum().item() == x.numel()


def test_sft_loss_equals_llada_reference() -> None:
    model = _model(1)
    x = torch.randint(0, 60, (4, 24))
    prompt_lengths = torch.tensor([3, 10, 1, 20])
    prompt_mask = torch.arange(24)[None, :] < prompt_lengths[:, None]
    noised = forward_process(x, MASK_ID, mask_generator(3, 4), prompt_mask=prompt_mask)
    ours = diffusion_loss(model, noised).loss_sum / noised.normalizer

    # LLaDA SFT reference: prompt restored, CE / p_mask / answer_length, summed, / B.
    logits = model.logits(model(noised.noisy_ids))
    masked = noised.noisy_ids == MASK_ID
    answer_lengths = (~prompt_mask).sum(-1, keepdim=True).expand_as(x)
    p_mask = noised.p_mask[:, None].expand_as(x)
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none") / p_mask[masked]
    ref = torch.sum(ce / answer_lengths[masked]) / x.shape[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_random_length_cut_changes_the_normaliser() -> None:
    x = torch.randint(0, 60, (2, 64))
    doc_ids = torch.zeros_like(x)
    noised = forward_process(x, MASK_ID, mask_generator(0, 5), doc_ids=doc_ids, random_length_prob=1.0)
    length = noised.input_ids.shape[1]
    assert 1 <= length <= 64
    assert noised.normalizer == 2 * length
    assert noised.doc_ids is not None and noised.doc_ids.shape == (2, length)
    assert torch.equal(noised.input_ids, x[:, :length])
    never = forward_process(x, MASK_ID, mask_generator(0, 5), random_length_prob=0.0)
    assert never.input_ids.shape == x.shape


def test_loss_with_nothing_masked_is_zero_and_backpropagates() -> None:
    model = _model()
    x = torch.randint(0, 60, (2, 8))
    prompt_mask = torch.ones_like(x, dtype=torch.bool)
    noised = forward_process(x, MASK_ID, mask_generator(0, 0), prompt_mask=prompt_mask)
    parts = diffusion_loss(model, noised)
    assert parts.num_masked == 0 and parts.loss_sum.item() == 0.0
    parts.loss_sum.backward()


def test_stratified_t_covers_every_stratum_once() -> None:
    x = torch.zeros(8, 16, dtype=torch.long)
    noised = forward_process(x, MASK_ID, mask_generator(0, 9), stratified=True, eps=0.0)
    strata = torch.floor(noised.t * 8).long().sort().values
    assert torch.equal(strata, torch.arange(8))
    # a fresh draw moves the shared offset, so every t is still uniform on (0, 1) marginally
    other = forward_process(x, MASK_ID, mask_generator(0, 10), stratified=True, eps=0.0)
    assert not torch.equal(noised.t, other.t)


def test_count_form_masks_exactly_ceil_fraction_of_the_maskable_tokens() -> None:
    x = torch.randint(0, 60, (6, 40))
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[:, :8] = True  # a context prefix: never masked, not counted
    fraction = torch.tensor([1e-6, 0.1, 0.33, 0.5, 0.99, 1.0])
    noised = forward_process(x, MASK_ID, mask_generator(0, 4), keep=keep, mask_fraction=fraction)
    count = noised.masked.sum(dim=1)
    assert count.tolist() == [1, 4, 11, 16, 32, 32]  # ceil(f * 32), at least one
    assert not (noised.masked & keep).any()
    torch.testing.assert_close(noised.p_mask, count.float() / 32)
    torch.testing.assert_close(noised.weights, 32 / count.float())  # n / l
    assert torch.equal(noised.noisy_ids[noised.masked], torch.full_like(x[noised.masked], MASK_ID))
    assert torch.equal(noised.noisy_ids[~noised.masked], x[~noised.masked])
    # the l positions are drawn uniformly: over many draws every maskable position is hit about equally
    hits = torch.zeros(40)
    for step in range(400):
        hits += forward_process(x[:1], MASK_ID, mask_generator(1, step), keep=keep[:1],
                                mask_fraction=torch.tensor([0.25])).masked[0].float()
    assert hits[:8].sum() == 0 and hits[8:].min() > 40 and hits[8:].max() < 135  # 400 * 8 / 32 = 100 each
    with pytest.raises(ValueError, match="mask_fraction"):
        forward_process(x, MASK_ID, mask_generator(0, 4), stratified=True, mask_fraction=fraction)


def test_count_and_t_estimators_agree_and_count_varies_less() -> None:
    """Both forms estimate the same bound (LLaDA eqs. 3 and 6); the count form's spread over seeds is smaller,
    because no draw puts a 1/eps weight on a single token."""
    from dlm.training.evaluate import evaluate_nelbo

    model = _model(3).eval()
    batches = [{"input_ids": torch.randint(0, 60, (8, 32), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    cpu = torch.device("cpu")

    def nelbo(estimator: str, seed: int, samples: int, cap: int | None = None) -> float:
        return evaluate_nelbo(model, batches, MASK_ID, eps=1e-3, samples=samples, seed=seed, device=cpu,
                              estimator=estimator, max_scored_per_row=cap)

    count = torch.tensor([nelbo("count", s, 4) for s in range(12)])
    t_form = torch.tensor([nelbo("t", s, 4) for s in range(12)])
    assert count.std() < 0.2 * t_form.std()  # measured: 0.005 against 0.21 nats
    # the same expectation: 12 x 16 t-form draws have a standard error of about 0.03 here
    t_mean = torch.tensor([nelbo("t", 50 + s, 16) for s in range(12)]).mean().item()
    assert count.mean().item() == pytest.approx(t_mean, abs=0.15)
    # scoring at most 4 of the masked positions per row, reweighted, estimates the same figure
    capped = torch.tensor([nelbo("count", 200 + s, 4, cap=4) for s in range(12)])
    assert capped.mean().item() == pytest.approx(count.mean().item(), abs=0.02)
    assert capped.std() < 0.1
    with pytest.raises(ValueError, match="estimator"):
        nelbo("bogus", 0, 1)

"""The training-time forward process on top of the LLaDA objectives: SFT rows, the generation-start rows the
length head is trained on, pad-share annealing, ``shift`` (AR adaptation) and attention-mask annealing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlm.config import ObjectiveSection
from dlm.generation.rows import canvas_logits, pack_rows
from dlm.modeling import DiffusionTransformer, LengthHeadConfig, preset
from dlm.modeling.length_head import bucket_of
from dlm.training.objective import LENGTH_STATS, diffusion_loss, mask_generator, noise_batch, subsample_scored

MASK = 50257
EOS = 50256


def _model(head: bool = True, seed: int = 0) -> DiffusionTransformer:
    torch.manual_seed(seed)
    cfg = preset("tiny").model_copy(update={"length_head": LengthHeadConfig(max_len=64) if head else None})
    return DiffusionTransformer(cfg)


def _sft_batch(b: int = 6, length: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows ``[prompt, answer, EOS, pad …]`` of varied prompt and answer lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((b, length), EOS)
    prompt_mask = torch.zeros(b, length, dtype=torch.bool)
    answer_length = torch.empty(b, dtype=torch.long)
    for r in range(b):
        p = int(torch.randint(2, 10, (), generator=gen))
        a = int(torch.randint(1, length - p - 1, (), generator=gen))
        ids[r, : p + a] = torch.randint(0, 1000, (p + a,), generator=gen)
        prompt_mask[r, :p] = True
        answer_length[r] = a
    return {"input_ids": ids, "doc_ids": torch.zeros_like(ids), "prompt_mask": prompt_mask, "answer_length": answer_length}


def _rows_batch(b: int = 6, length: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = _sft_batch(b, length, seed)
    lengths = batch["prompt_mask"].sum(1) + batch["answer_length"]  # whole document, no prompt
    return {"input_ids": batch["input_ids"], "doc_ids": batch["doc_ids"], "answer_length": lengths}


def test_sft_generation_start_rows_mask_the_whole_answer_and_never_the_prompt() -> None:
    batch = _sft_batch()
    objective = ObjectiveSection(kind="sft", length_loss_weight=1.0, length_rows=0.5)
    noised = noise_batch(batch, objective, MASK, mask_generator(0, 1), train_length_head=True)
    targets = noised.length
    assert targets is not None and targets.num_rows == 3
    prompt = batch["prompt_mask"]
    assert not (noised.masked & prompt).any()
    full = targets.rows
    assert torch.equal(noised.masked[full], ~prompt[full])  # t = 1: every answer/pad position masked
    assert torch.all(noised.p_mask[full] == 1.0)
    assert torch.equal(targets.answer_start, prompt.sum(1))
    assert torch.equal(targets.answer_length, batch["answer_length"])
    assert torch.equal(targets.prompt_mask, prompt)


def test_rows_generation_start_rows_keep_a_random_document_prefix_as_context() -> None:
    batch = _rows_batch()
    objective = ObjectiveSection(length_loss_weight=1.0, length_rows=1.0, random_length_prob=1.0)
    noised = noise_batch(batch, objective, MASK, mask_generator(0, 3), train_length_head=True)
    targets = noised.length
    assert targets is not None and bool(targets.rows.all())
    assert noised.input_ids.shape == batch["input_ids"].shape  # no random-length cut of structured rows
    start = targets.answer_start
    assert bool((start >= 0).all()) and bool((start < batch["answer_length"]).all())
    assert len(set(start.tolist())) > 1
    positions = torch.arange(batch["input_ids"].shape[1])[None, :]
    assert torch.equal(noised.masked, positions >= start[:, None])
    assert torch.equal(targets.answer_length, batch["answer_length"] - start)
    assert torch.equal(targets.prompt_mask, positions < start[:, None])


def test_pad_share_zero_masks_no_padding_and_one_masks_like_any_token() -> None:
    batch = _sft_batch(b=8)
    objective = ObjectiveSection(kind="sft")
    first_pad = batch["prompt_mask"].sum(1) + batch["answer_length"] + 1
    pad = torch.arange(48)[None, :] >= first_pad[:, None]
    none = noise_batch(batch, objective, MASK, mask_generator(0, 1), pad_share=0.0)
    assert not (none.masked & pad).any()
    assert (none.masked & ~pad).any()
    eos_position = torch.zeros_like(pad)
    eos_position[torch.arange(8), first_pad - 1] = True
    draws = [noise_batch(batch, objective, MASK, mask_generator(0, s), pad_share=0.0).masked[eos_position]
             for s in range(20)]
    assert torch.stack(draws).any(), "the answer's own EOS stays a target"
    full = noise_batch(batch, objective, MASK, mask_generator(0, 1), pad_share=1.0)
    assert (full.masked & pad).any()
    rates = [noise_batch(batch, objective, MASK, mask_generator(0, s), pad_share=0.5) for s in range(60)]
    frac = sum(float((n.masked & pad).sum()) for n in rates) / sum(float((n.p_mask[:, None] * pad).sum()) for n in rates)
    assert abs(frac - 0.5) < 0.08


def test_length_loss_is_one_mean_however_the_step_is_split() -> None:
    """Two micro-batches of 3 rows give the gradient of one batch of 6 (global normalisers)."""
    batch = _sft_batch()
    objective = ObjectiveSection(kind="sft", length_loss_weight=0.7, length_rows=1.0)

    def grads(parts_of: list[slice]) -> list[torch.Tensor]:
        model = _model()
        noised = [noise_batch({k: v[s] for k, v in batch.items()}, objective, MASK, mask_generator(0, 1, 0, 0),
                              train_length_head=True) for s in parts_of]
        positions = sum(n.length.num_positions(48) for n in noised)
        rows = sum(n.length.num_rows for n in noised)
        denominator = sum(n.normalizer for n in noised)
        for n in noised:
            n.length.eos_norm, n.length.bucket_norm = positions, rows
            diffusion_loss(model, n).objective(denominator).backward()
        return [p.grad.clone() for p in model.length_head.parameters()]

    # the same rows must be fully masked both ways: length_rows=1.0 puts every row at t = 1
    whole, split = grads([slice(0, 6)]), grads([slice(0, 3), slice(3, 6)])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_length_loss_matches_a_plain_reference() -> None:
    batch = _sft_batch()
    model = _model()
    with torch.no_grad():  # non-zero heads, so the reference is not trivially ln 2 + ln K
        for p in model.length_head.parameters():
            p.normal_(0, 0.1)
    objective = ObjectiveSection(kind="sft", length_loss_weight=2.0, length_rows=0.5)
    noised = noise_batch(batch, objective, MASK, mask_generator(0, 5), train_length_head=True)
    t = noised.length
    t.eos_norm, t.bucket_norm = t.num_positions(48), t.num_rows
    parts = diffusion_loss(model, noised)

    hidden = model(noised.noisy_ids)
    bce, ce = [], []
    for r in t.rows.nonzero().flatten().tolist():
        out = model.length_head(hidden[r : r + 1], batch["prompt_mask"][r : r + 1])
        start, length = int(t.answer_start[r]), int(t.answer_length[r])
        target = (torch.arange(48) - start >= length).float()[start:]
        bce.append(F.binary_cross_entropy_with_logits(out.eos_logits[0, start:], target, reduction="none"))
        ce.append(F.cross_entropy(out.bucket_logits, bucket_of(torch.tensor([length]), 16, 64)))
    reference = 2.0 * (torch.cat(bce).mean() + torch.stack(ce).mean())
    torch.testing.assert_close(parts.length_loss, reference, rtol=1e-5, atol=1e-6)
    assert parts.length_stats is not None and parts.length_stats.shape == (len(LENGTH_STATS),)
    assert int(parts.length_stats[LENGTH_STATS.index("bucket_count")]) == t.num_rows


def test_shift_never_masks_position_zero_and_predicts_each_token_from_the_previous_state() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (4, 32))
    model = _model(head=False)
    objective = ObjectiveSection(shift=True, random_length_prob=0.0)
    noised = noise_batch({"input_ids": ids}, objective, MASK, mask_generator(0, 2))
    assert noised.shift and not noised.masked[:, 0].any()
    parts = diffusion_loss(model, noised)
    logits = model.logits(model(noised.noisy_ids))
    rows, cols = noised.masked.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows, cols - 1], ids[rows, cols], reduction="none")
    reference = (ce * noised.weights[rows]).sum()
    torch.testing.assert_close(parts.loss_sum, reference, rtol=1e-5, atol=1e-4)


def test_attention_annealing_starts_causal_and_ends_bidirectional() -> None:
    ids = torch.randint(0, 1000, (2, 16))
    objective = ObjectiveSection(attention_annealing_steps=100)
    causal = noise_batch({"input_ids": ids}, objective, MASK, mask_generator(0, 1), attention_ratio=0.0)
    assert causal.attn_mask is not None
    assert torch.equal(causal.attn_mask, torch.ones(16, 16, dtype=torch.bool).tril())
    half = noise_batch({"input_ids": ids}, objective, MASK, mask_generator(0, 1), attention_ratio=0.5)
    future = half.attn_mask.triu(1).sum().item() / (16 * 15 / 2)
    assert 0.3 < future < 0.7
    done = noise_batch({"input_ids": ids}, objective, MASK, mask_generator(0, 1), attention_ratio=1.0)
    assert done.attn_mask is None
    # the causal mask reaches the model: under it, changing a later token leaves earlier states alone
    model = _model(head=False)
    changed = causal.noisy_ids.clone()
    changed[:, -1] = 7
    a = model(causal.noisy_ids, attn_mask=causal.attn_mask)
    b = model(changed, attn_mask=causal.attn_mask)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


def test_shift_generation_reads_the_canvas_logits_one_position_earlier() -> None:
    model = _model(head=False).eval()
    rows = pack_rows([torch.tensor([5, 6, 7])], [torch.full((4,), MASK)], EOS)
    with torch.no_grad():
        full = model.logits(model(rows.input_ids))
        shifted = canvas_logits(model, rows, cfg_scale=0.0, mask_id=MASK, shift=True)
        plain = canvas_logits(model, rows, cfg_scale=0.0, mask_id=MASK)
    torch.testing.assert_close(shifted, full[:, 2:6])
    torch.testing.assert_close(plain, full[:, 3:7])


def test_scored_subsample_is_an_unbiased_estimate_of_the_full_loss() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (4, 64))
    model = _model(head=False)
    full = ObjectiveSection(random_length_prob=0.0)
    capped = ObjectiveSection(random_length_prob=0.0, max_scored_per_row=8)
    base = noise_batch({"input_ids": ids}, full, MASK, mask_generator(0, 1))
    with torch.no_grad():
        want = diffusion_loss(model, base).loss_sum
        estimates = []
        for s in range(300):
            n = noise_batch({"input_ids": ids}, capped, MASK, mask_generator(0, 1))
            assert torch.equal(n.masked, base.masked) and torch.equal(n.noisy_ids, base.noisy_ids)
            subsample_scored(n, 8, torch.Generator().manual_seed(s))
            assert bool((n.scored.sum(1) == n.masked.sum(1).clamp(max=8)).all()) and not (n.scored & ~n.masked).any()
            estimates.append(diffusion_loss(model, n).loss_sum)
    mean = torch.stack(estimates).mean()
    assert abs(float(mean - want)) < 0.02 * float(want)
    assert not torch.allclose(estimates[0], estimates[1])


def test_generation_sized_canvases_hide_the_rest_of_the_row() -> None:
    """``canvas_share``: a row's canvas is its answer's power-of-two budget (x1, x2 or x4) when that is shorter
    than the row; past it nothing is masked, scored or attended to, and the row's loss is normalised by its
    canvas. The length head's rows keep the full canvas their prediction pass has."""
    batch = _sft_batch(b=64, length=96, seed=3)
    objective = ObjectiveSection(kind="sft", canvas_share=1.0, length_loss_weight=1.0, length_rows=0.25)
    noised = noise_batch(batch, objective, MASK, mask_generator(0, 1), train_length_head=True)
    prompt, lengths = batch["prompt_mask"], batch["answer_length"]
    start = prompt.sum(1)
    outside = noised.doc_ids == 1
    assert noised.length is not None and not outside[noised.length.rows].any()
    ends = torch.where(outside.any(1), outside.int().argmax(1), torch.full_like(start, 96))
    assert torch.equal(outside, torch.arange(96)[None, :] >= ends[:, None]), "the outside is the row's tail"
    cut = outside.any(1)
    assert cut.sum() > 20, "most rows have room for a budget-sized canvas"
    canvas = (ends - start)[cut]
    tight = torch.exp2(torch.ceil(torch.log2((lengths[cut] + 1).float()))).long()
    assert torch.all(canvas >= lengths[cut] + 1), "the answer and its EOS always fit"
    assert set((canvas // tight).tolist()) == {1, 2, 4}
    assert not (noised.masked & outside).any()
    assert torch.equal(noised.doc_ids[~outside], torch.zeros_like(noised.doc_ids[~outside]))
    # normalised by the canvas: a canvas row's weights are 1 / (p_mask * its canvas answer region)
    rows = (~noised.length.rows & cut).nonzero()[:, 0]
    region = (ends - start)[rows].float()
    torch.testing.assert_close(noised.weights[rows], 1.0 / (noised.p_mask[rows] * region))

    plain = noise_batch(batch, ObjectiveSection(kind="sft"), MASK, mask_generator(0, 1))
    assert torch.equal(plain.doc_ids, batch["doc_ids"]), "share 0 changes nothing"


def test_a_hidden_tail_does_not_change_the_canvas_loss() -> None:
    """The loss of a row whose tail is outside its canvas equals the loss of the row cut at the canvas."""
    model = _model(head=False)
    batch = _sft_batch(b=1, length=48, seed=5)
    objective = ObjectiveSection(kind="sft", canvas_share=1.0)
    for seed in range(20):
        noised = noise_batch(batch, objective, MASK, mask_generator(seed, 1))
        if (noised.doc_ids == 1).any():
            break
    end = int((noised.doc_ids[0] == 1).int().argmax())
    with torch.no_grad():
        full = diffusion_loss(model, noised).loss_sum
        cut = noise_batch(batch, ObjectiveSection(kind="sft"), MASK, mask_generator(0, 1))
        for name in ("input_ids", "noisy_ids", "masked", "doc_ids"):
            setattr(cut, name, getattr(noised, name)[:, :end].clone())
        cut.weights, cut.p_mask, cut.t = noised.weights, noised.p_mask, noised.t
        torch.testing.assert_close(diffusion_loss(model, cut).loss_sum, full)

"""Attention backends agree with each other and respect document boundaries; the fused masked LM loss equals
the naive projection + cross-entropy in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlm.kernels import attention, masked_lm_loss

# Packed rows of ragged documents, including length-1 documents, a row that is one document, and trailing
# single-token documents (padding-like).
DOC_IDS = torch.tensor(
    [
        [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 4, 4, 4, 4, 5, 6],
        [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 5, 5, 6, 7],
    ]
)


def _qkv(n_heads: int, n_kv_heads: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    b, t = DOC_IDS.shape
    q = torch.randn(b, n_heads, t, 8, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(b, n_kv_heads, t, 8, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(b, n_kv_heads, t, 8, generator=gen, dtype=dtype, requires_grad=True)
    return q, k, v


def _run(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    out = attention(q, k, v, doc_ids=doc_ids, backend=backend)
    upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    return out, grads


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("with_docs", [True, False])
def test_sdpa_matches_math_forward_and_backward(n_kv_heads: int, with_docs: bool) -> None:
    q, k, v = _qkv(4, n_kv_heads)
    doc_ids = DOC_IDS if with_docs else None
    out_sdpa, grads_sdpa = _run("sdpa", q, k, v, doc_ids)
    out_math, grads_math = _run("math", q, k, v, doc_ids)
    assert out_sdpa.shape == q.shape
    torch.testing.assert_close(out_sdpa, out_math, atol=1e-5, rtol=1e-5)
    for g_sdpa, g_math, x in zip(grads_sdpa, grads_math, (q, k, v)):
        assert g_sdpa.shape == x.shape
        torch.testing.assert_close(g_sdpa, g_math, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_documents_are_isolated_and_single_tokens_see_themselves(backend: str) -> None:
    q, k, v = _qkv(2, 2)
    out = attention(q, k, v, doc_ids=DOC_IDS, backend=backend)
    # A length-1 document attends only to itself: its output is its own value vector.
    torch.testing.assert_close(out[0, :, 3], v[0, :, 3], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2, :, 0], v[2, :, 0], atol=1e-6, rtol=0)
    # Each document alone gives the same output as inside the packed row.
    for start, end in [(0, 3), (4, 9), (10, 14)]:
        alone = attention(q[:1, :, start:end], k[:1, :, start:end], v[:1, :, start:end], backend=backend)
        torch.testing.assert_close(out[:1, :, start:end], alone, atol=1e-6, rtol=1e-5)


def test_attention_is_bidirectional() -> None:
    q, k, v = _qkv(2, 2)
    out = attention(q, k, v)
    v2 = v.detach().clone()
    v2[:, :, -1] += 1.0
    assert not torch.allclose(attention(q, k, v2)[:, :, 0], out[:, :, 0])


def test_bf16_sdpa_close_to_math() -> None:
    q, k, v = _qkv(4, 2, dtype=torch.bfloat16)
    out_sdpa = attention(q, k, v, doc_ids=DOC_IDS, backend="sdpa")
    out_math = attention(q, k, v, doc_ids=DOC_IDS, backend="math")
    assert out_sdpa.dtype == out_math.dtype == torch.bfloat16
    torch.testing.assert_close(out_sdpa.float(), out_math.float(), atol=2e-2, rtol=2e-2)


def test_unknown_backend_names_the_allowed_ones() -> None:
    q, k, v = _qkv(2, 2)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash3'.*allowed: math, sdpa"):
        attention(q, k, v, backend="flash3")


def test_bad_shapes_are_rejected() -> None:
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="must divide"):
        attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="doc_ids must have shape"):
        attention(q, k, v, doc_ids=DOC_IDS[:, :-1])
    with pytest.raises(ValueError, match=r"q \[B, H, T, hd\]"):
        attention(q[0], k[0], v[0])


# ---------------------------------------------------------------------------------------------- loss


def _loss_inputs(
    n: int, d: int = 16, vocab: int = 37, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) * 0.3).to(dtype).requires_grad_()
    bias = (torch.randn(vocab, generator=gen) * 0.1).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    token_weights = torch.rand(n, generator=gen) * 4 + 1  # like 1 / p_mask
    return hidden, weight, bias, targets, token_weights


def _naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The textbook computation: full logits, then weighted per-row cross-entropy."""
    logits = (hidden @ weight.T + (bias if bias is not None else 0)).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * (token_weights if token_weights is not None else 1.0)).sum()


def _grads(loss: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("chunk_size", [3, 5, 10, 11, 4096])
@pytest.mark.parametrize("with_bias", [True, False])
def test_masked_lm_loss_matches_naive(chunk_size: int, with_bias: bool) -> None:
    hidden, weight, bias, targets, tw = _loss_inputs(10)
    b = bias if with_bias else None
    inputs = (hidden, weight, bias) if with_bias else (hidden, weight)
    fused = masked_lm_loss(hidden, weight, targets, tw, bias=b, chunk_size=chunk_size)
    naive = _naive(hidden, weight, targets, tw, b)
    assert fused.shape == () and fused.dtype == torch.float32
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)
    for g_fused, g_naive in zip(_grads(fused, inputs), _grads(naive, inputs)):
        torch.testing.assert_close(g_fused, g_naive, atol=1e-5, rtol=1e-5)


def test_masked_lm_loss_default_weights_are_ones_and_grad_output_scales() -> None:
    hidden, weight, _, targets, _ = _loss_inputs(7)
    fused = masked_lm_loss(hidden, weight, targets, chunk_size=3)
    naive = _naive(hidden, weight, targets)
    torch.testing.assert_close(fused, naive)
    g_fused = _grads(fused * 2.5, (hidden, weight))
    g_naive = _grads(naive * 2.5, (hidden, weight))
    for a, b in zip(g_fused, g_naive):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_masked_lm_loss_gradient_reaches_token_weights() -> None:
    hidden, weight, _, targets, tw = _loss_inputs(6)
    tw = tw.clone().requires_grad_()
    (g_fused,) = _grads(masked_lm_loss(hidden, weight, targets, tw, chunk_size=4), (tw,))
    (g_naive,) = _grads(_naive(hidden, weight, targets, tw), (tw,))
    torch.testing.assert_close(g_fused, g_naive)


def test_masked_lm_loss_empty_batch_gives_zero_with_zero_grads() -> None:
    hidden, weight, bias, targets, tw = _loss_inputs(0)
    loss = masked_lm_loss(hidden, weight, targets, tw, bias=bias)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_masked_lm_loss_with_frozen_inputs() -> None:
    hidden, weight, _, targets, tw = _loss_inputs(9)
    frozen_w = weight.detach()
    fused = masked_lm_loss(hidden, frozen_w, targets, tw, chunk_size=4)
    (g_h,) = _grads(fused, (hidden,))
    (g_ref,) = _grads(_naive(hidden, frozen_w, targets, tw), (hidden,))
    torch.testing.assert_close(g_h, g_ref, atol=1e-5, rtol=1e-5)
    # Nothing requires grad: a plain evaluation value.
    value = masked_lm_loss(hidden.detach(), frozen_w, targets, tw, chunk_size=4)
    assert value.grad_fn is None
    torch.testing.assert_close(value, fused.detach())


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_masked_lm_loss_bf16(chunk_size: int) -> None:
    hidden, weight, bias, targets, tw = _loss_inputs(24, d=32, vocab=101, dtype=torch.bfloat16)
    inputs = (hidden, weight, bias)
    fused = masked_lm_loss(hidden, weight, targets, tw, bias=bias, chunk_size=chunk_size)
    # Reference: the same bf16 parameters, computed entirely in fp32.
    ref_inputs = tuple(x.detach().float().requires_grad_() for x in inputs)
    naive = _naive(ref_inputs[0], ref_inputs[1], targets, tw, ref_inputs[2])
    torch.testing.assert_close(fused, naive, atol=0.1, rtol=1e-2)
    for g_fused, g_naive, x in zip(_grads(fused, inputs), _grads(naive, ref_inputs), inputs):
        assert g_fused.dtype == x.dtype == torch.bfloat16
        torch.testing.assert_close(g_fused.float(), g_naive, atol=5e-2, rtol=5e-2)


def test_masked_lm_loss_under_autocast() -> None:
    hidden, weight, bias, targets, tw = _loss_inputs(12, d=32, vocab=64)
    inputs = (hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = masked_lm_loss(hidden, weight, targets, tw, bias=bias, chunk_size=5)
    naive = _naive(hidden, weight, targets, tw, bias)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, naive, atol=0.1, rtol=1e-2)
    for g_fused, g_naive in zip(_grads(fused, inputs), _grads(naive, inputs)):
        assert g_fused.dtype == torch.float32
        torch.testing.assert_close(g_fused, g_naive, atol=5e-2, rtol=5e-2)


def test_masked_lm_loss_rejects_bad_input() -> None:
    hidden, weight, bias, targets, tw = _loss_inputs(5)
    with pytest.raises(ValueError, match="hidden"):
        masked_lm_loss(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="targets"):
        masked_lm_loss(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="token_weights"):
        masked_lm_loss(hidden, weight, targets, tw[:-1])
    with pytest.raises(ValueError, match="bias"):
        masked_lm_loss(hidden, weight, targets, bias=bias[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        masked_lm_loss(hidden, weight, targets, chunk_size=0)

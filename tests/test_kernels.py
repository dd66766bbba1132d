"""Attention backends agree with the math reference and respect document boundaries; backends that cannot run
say what to do; the fused masked LM loss equals the naive projection + cross-entropy in value and gradients
(chunked on CPU, Liger on CUDA)."""

from __future__ import annotations

import importlib
from typing import Any, get_args

import pytest
import torch
import torch.nn.functional as F

from dlm.errors import ConfigError
from dlm.kernels import (
    CHOICES,
    AttentionBackendError,
    AttentionMask,
    anneal_ratio,
    annealed_mask,
    attention,
    check_backend,
    masked_lm_loss,
    masked_lm_loss_rows,
    resolve_backend,
)
from dlm.kernels import flash as flash_module
from dlm.kernels import liger as liger_module
from dlm.kernels.masks import varlen_layout
from dlm.modeling import TransformerConfig, build_model

# The package re-exports the function `attention`, which shadows the module of the same name.
attention_module = importlib.import_module("dlm.kernels.attention")

# Packed rows of ragged documents, including length-1 documents, a row that is one document, and trailing
# single-token documents (padding-like).
DOC_IDS = torch.tensor(
    [
        [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 4, 4, 4, 4, 5, 6],
        [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 5, 5, 6, 7],
    ]
)
# Backends that run on CPU; flex has no backward pass there.
CPU_BACKENDS = ["sdpa", "flex", "math"]
CPU_BACKWARD = {"sdpa", "math"}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _qkv(
    n_heads: int, n_kv_heads: int, dtype: torch.dtype = torch.float32, grad: bool = True, device: str = "cpu"
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    b, t = DOC_IDS.shape
    shapes = [(b, n_heads, t, 8), (b, n_kv_heads, t, 8), (b, n_kv_heads, t, 8)]
    return tuple(torch.randn(s, generator=gen).to(device, dtype).requires_grad_(grad) for s in shapes)


def _run(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    mask: AttentionMask | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Output and, when the inputs require grad, the gradients of a fixed projection of it."""
    out = attention(q, k, v, doc_ids=doc_ids, backend=backend, mask=mask)
    if not q.requires_grad:
        return out, None
    upstream = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    return out, torch.autograd.grad((out.float() * upstream).sum(), (q, k, v))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, ...]:
    """The math backend on fp32 copies of the inputs."""
    inputs = [x.detach().float().requires_grad_(x.requires_grad) for x in (q, k, v)]
    return _run("math", *inputs, **kw)  # type: ignore[return-value]


def _assert_matches_math(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> None:
    tol = TOL[q.dtype]
    out, grads = _run(backend, q, k, v, **kw)
    ref_out, ref_grads = _reference(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    if grads is not None:
        for g, g_ref, x in zip(grads, ref_grads, (q, k, v)):
            assert g.shape == x.shape and g.dtype == x.dtype
            torch.testing.assert_close(g.float(), g_ref, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------- backends on CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("with_docs", [True, False], ids=["packed", "dense"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cpu_backend_matches_math(backend: str, with_docs: bool, n_kv_heads: int, dtype: torch.dtype) -> None:
    """Forward everywhere, backward where the backend has one on CPU (flex does not)."""
    q, k, v = _qkv(4, n_kv_heads, dtype, grad=backend in CPU_BACKWARD)
    _assert_matches_math(backend, q, k, v, doc_ids=DOC_IDS if with_docs else None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_documents_are_isolated_and_single_tokens_see_themselves(backend: str) -> None:
    q, k, v = _qkv(2, 2, grad=False)
    out = attention(q, k, v, doc_ids=DOC_IDS, backend=backend)
    # A length-1 document attends only to itself: its output is its own value vector.
    torch.testing.assert_close(out[0, :, 3], v[0, :, 3], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2, :, 0], v[2, :, 0], atol=1e-6, rtol=0)
    # Each document alone gives the same output as inside the packed row.
    for start, end in [(0, 3), (4, 9), (10, 14)]:
        alone = attention(q[:1, :, start:end], k[:1, :, start:end], v[:1, :, start:end], backend=backend)
        torch.testing.assert_close(out[:1, :, start:end], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_is_bidirectional(backend: str) -> None:
    q, k, v = _qkv(2, 2, grad=False)
    out = attention(q, k, v, backend=backend)
    v2 = v.clone()
    v2[:, :, -1] += 1.0
    assert not torch.allclose(attention(q, k, v2, backend=backend)[:, :, 0], out[:, :, 0])


def test_one_mask_serves_many_calls_and_equals_doc_ids() -> None:
    q, k, v = _qkv(4, 2, grad=False)
    mask = AttentionMask(DOC_IDS)
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(
            attention(q, k, v, mask=mask, backend=backend), attention(q, k, v, doc_ids=DOC_IDS, backend=backend)
        )
    assert mask.dense() is mask.dense()  # built once, reused by every layer
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, doc_ids=DOC_IDS, mask=mask)


def test_flex_without_backward_on_cpu_says_what_to_use() -> None:
    q, k, v = _qkv(2, 2)
    with pytest.raises(AttentionBackendError, match=r"no backward pass on CPU.*model.attention=sdpa"):
        attention(q, k, v, doc_ids=DOC_IDS, backend="flex")


# ----------------------------------------------------------------------------- flash-attn's layout


def test_varlen_layout_splits_runs_and_rows() -> None:
    doc_ids = torch.tensor([[5, 5, 6, 7, 7, 7], [7, 7, 7, 7, 1, 5]])
    cu_seqlens, max_seqlen = varlen_layout(doc_ids)
    # Row 1 starts with the id row 0 ended with: still a new document. Length-1 documents are kept.
    assert cu_seqlens.tolist() == [0, 2, 3, 6, 10, 11, 12]
    assert cu_seqlens.dtype == torch.int32 and max_seqlen == 4


def _reference_flash_kernels() -> tuple[Any, Any]:
    """flash_attn_func / flash_attn_varlen_func written with the math backend, so the layout code that feeds
    flash-attn (transposes, cu_seqlens, GQA) is tested on CPU; the real kernels run under the gpu marker."""

    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool) -> torch.Tensor:
        assert dropout_p == 0.0 and causal is False
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="math").transpose(1, 2)

    def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
               max_q: int, max_k: int, dropout_p: float, causal: bool) -> torch.Tensor:  # fmt: skip
        assert dropout_p == 0.0 and causal is False and cu_q.dtype == torch.int32
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        bounds = cu_q.tolist()
        segments = []
        for a, b in zip(bounds, bounds[1:]):
            seg = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]  # [1, H, L, hd]
            segments.append(attention(*seg, backend="math")[0].transpose(0, 1))
        return torch.cat(segments)

    return dense, varlen


@pytest.mark.parametrize("n_kv_heads", [4, 1])
@pytest.mark.parametrize("with_docs", [True, False], ids=["packed", "dense"])
def test_flash_layout_matches_math(monkeypatch: pytest.MonkeyPatch, with_docs: bool, n_kv_heads: int) -> None:
    monkeypatch.setattr(flash_module, "_kernels", _reference_flash_kernels)
    q, k, v = _qkv(4, n_kv_heads, torch.bfloat16)
    mask = AttentionMask(DOC_IDS) if with_docs else None
    out = flash_module.flash_attention(q, k, v, mask)
    ref = attention(q, k, v, mask=mask, backend="math")
    assert out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in (q, k, v))


def test_flash_refuses_fp32_and_annealing_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash_module, "_kernels", _reference_flash_kernels)
    q, k, v = _qkv(2, 2, grad=False)
    with pytest.raises(AttentionBackendError, match="float16/bfloat16 only"):
        flash_module.flash_attention(q, k, v, None)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    allowed = annealed_mask(DOC_IDS.shape[1], 0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AttentionBackendError, match="document masks only"):
        flash_module.flash_attention(q, k, v, AttentionMask(DOC_IDS, allowed))


# ------------------------------------------------------------------------------- choosing a backend


def test_config_choices_are_the_kernel_choices() -> None:
    assert get_args(TransformerConfig.model_fields["attention"].annotation) == CHOICES
    assert TransformerConfig.model_fields["attention"].default == "auto"


def test_auto_picks_sdpa_on_cpu_and_flash_on_cuda_when_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(attention_module, "flash_installed", lambda: True)
    assert resolve_backend("auto", cuda, torch.bfloat16, head_dim=128) == "flash"
    assert resolve_backend("auto", cuda, torch.float32, head_dim=128) == "sdpa"  # flash computes in 16 bits only
    assert resolve_backend("auto", cuda, torch.bfloat16, head_dim=512) == "sdpa"
    assert resolve_backend("auto", cuda, torch.bfloat16, any_mask=True) == "sdpa"  # annealing needs a mask
    monkeypatch.setattr(attention_module, "flash_installed", lambda: False)
    assert resolve_backend("auto", cuda, torch.bfloat16, head_dim=128) == "sdpa"


def test_missing_backend_names_what_to_install_or_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_module, "flash_installed", lambda: False)
    with pytest.raises(AttentionBackendError, match=r"pip install flash-attn.*model.attention=auto") as info:
        resolve_backend("flash", torch.device("cuda"), torch.bfloat16)
    assert isinstance(info.value, ConfigError)  # the CLI prints it as one line and exits 2
    monkeypatch.setattr(attention_module, "flash_installed", lambda: True)
    with pytest.raises(AttentionBackendError, match="runs on CUDA only"):
        resolve_backend("flash", torch.device("cpu"))
    with pytest.raises(AttentionBackendError, match="document masks only.*sdpa, flex or math"):
        resolve_backend("flash", torch.device("cuda"), torch.bfloat16, any_mask=True)
    monkeypatch.setattr(attention_module, "flex_installed", lambda: False)
    with pytest.raises(AttentionBackendError, match=r"'flex' needs torch >= 2.5"):
        resolve_backend("flex", torch.device("cpu"))


def test_missing_backend_fails_when_the_model_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_module, "flash_installed", lambda: False)
    cfg = TransformerConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, mlp_hidden=48, attention="flash")
    with pytest.raises(AttentionBackendError, match="pip install flash-attn"):
        build_model(cfg, "cpu")
    check_backend("flash", "meta")  # the real device is unknown on meta: decided when materialised


def test_unknown_backend_names_the_allowed_ones() -> None:
    q, k, v = _qkv(2, 2)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash3'.*allowed: auto, flash, flex, math, sdpa"):
        attention(q, k, v, backend="flash3")
    with pytest.raises(ValueError, match="unknown attention backend"):
        check_backend("flash3", "meta")


def test_bad_shapes_are_rejected() -> None:
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="must divide"):
        attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="doc_ids must have shape"):
        attention(q, k, v, doc_ids=DOC_IDS[:, :-1])
    with pytest.raises(ValueError, match=r"q \[B, H, T, hd\]"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="does not fit q"):
        attention(q, k, v, mask=AttentionMask(DOC_IDS[:2]))
    with pytest.raises(ValueError, match="bool"):
        AttentionMask(DOC_IDS, torch.ones(16, 16))


# --------------------------------------------------------------------------- attention-mask annealing


def test_anneal_ratio_rises_linearly_to_one() -> None:
    assert [anneal_ratio(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert anneal_ratio(0, 0) == 1.0
    with pytest.raises(ValueError):
        anneal_ratio(-1, 4)


def test_annealed_mask_is_causal_or_bernoulli() -> None:
    t = 64
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    assert torch.equal(annealed_mask(t, 0.0), causal)
    assert annealed_mask(t, 1.0) is None  # fully bidirectional: no mask, the fast kernels apply again
    mask = annealed_mask(t, 0.3, generator=torch.Generator().manual_seed(0))
    assert mask is not None and bool(mask[causal].all())
    future = mask[~causal].float().mean().item()
    assert 0.25 < future < 0.35
    again = annealed_mask(t, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("per_row", [False, True])
def test_annealed_mask_on_backends_that_take_it(backend: str, per_row: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    t = DOC_IDS.shape[1]
    allowed = torch.stack([annealed_mask(t, 0.4, generator=gen) for _ in range(DOC_IDS.shape[0])])  # type: ignore[misc]
    allowed = allowed if per_row else allowed[0]
    q, k, v = _qkv(4, 2, grad=backend in CPU_BACKWARD)
    for doc_ids in (DOC_IDS, None):
        mask = AttentionMask(doc_ids, allowed)
        _assert_matches_math(backend, q, k, v, mask=mask)
    # A key the mask rules out does not influence the query.
    out = attention(q, k, v, mask=AttentionMask(None, allowed), backend=backend)
    row_mask = allowed if allowed.dim() == 2 else allowed[0]
    hidden_key = int((~row_mask[0]).nonzero()[0])
    v2 = v.detach().clone()
    v2[:, :, hidden_key] += 10.0
    out2 = attention(q.detach(), k.detach(), v2, mask=AttentionMask(None, allowed), backend=backend)
    torch.testing.assert_close(out2[0, :, 0], out[0, :, 0].detach())


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


def test_masked_lm_loss_rows_gives_each_rows_unweighted_cross_entropy() -> None:
    hidden, weight, bias, targets, tw = _loss_inputs(10)
    loss, rows = masked_lm_loss_rows(hidden, weight, targets, tw, bias=bias, chunk_size=3)
    logits = (hidden @ weight.T + bias).float()
    torch.testing.assert_close(rows, F.cross_entropy(logits, targets, reduction="none").detach())
    assert not rows.requires_grad
    torch.testing.assert_close(loss, (rows * tw).sum())
    torch.testing.assert_close(loss, masked_lm_loss(hidden, weight, targets, tw, bias=bias, chunk_size=3))


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


# ---------------------------------------------------------------------------------- through the model


def _arch(**overrides: Any) -> TransformerConfig:
    base: dict[str, Any] = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48)
    return TransformerConfig(**{**base, **overrides})


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 97, DOC_IDS.shape, generator=torch.Generator().manual_seed(3))
    return ids, DOC_IDS


@pytest.mark.parametrize("backend", ["auto", "sdpa", "flex"])
def test_model_backends_match_math(backend: str) -> None:
    torch.manual_seed(0)
    reference = build_model(_arch(attention="math")).eval()
    model = build_model(_arch(attention=backend)).eval()
    model.load_state_dict(reference.state_dict())
    ids, doc_ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, doc_ids=doc_ids), reference(ids, doc_ids=doc_ids), atol=1e-5, rtol=1e-5)


def test_model_with_flex_cannot_train_on_cpu() -> None:
    model = build_model(_arch(attention="flex")).train()
    ids, doc_ids = _ids()
    with pytest.raises(AttentionBackendError, match="no backward pass on CPU"):
        model(ids, doc_ids=doc_ids)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_model_takes_an_annealed_mask(backend: str) -> None:
    torch.manual_seed(0)
    reference = build_model(_arch(attention="math")).eval()
    model = build_model(_arch(attention=backend)).eval()
    model.load_state_dict(reference.state_dict())
    ids, doc_ids = _ids()
    allowed = annealed_mask(ids.shape[1], 0.25, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, doc_ids=doc_ids, attn_mask=allowed)
        torch.testing.assert_close(out, reference(ids, doc_ids=doc_ids, attn_mask=allowed), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, model(ids, doc_ids=doc_ids), atol=1e-4)  # the mask did restrict attention


def test_compiled_blocks_match_eager_without_graph_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.compile: true`` compiles each block; the mask is prepared outside, so a block traces into one
    graph shared by every layer. Traced with aot_eager here (inductor's C++ build takes minutes on a small
    CPU); the gpu test below runs inductor itself."""
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build_model(_arch(attention="sdpa"))
    compiled = build_model(_arch(attention="sdpa", compile=True))
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints are interchangeable
    ids, doc_ids = _ids()
    outs = []
    for model in (eager, compiled):
        hidden = model(ids, doc_ids=doc_ids)
        hidden.square().mean().backward()
        outs.append(hidden)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, atol=1e-6, rtol=1e-6, msg=name)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ GPU


def _cuda_qkv(n_kv_heads: int, t: int = 384, hd: int = 64) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 8, t, hd), (2, n_kv_heads, t, hd), (2, n_kv_heads, t, hd)]
    return tuple(torch.randn(s, generator=gen).cuda().bfloat16().requires_grad_() for s in shapes)


def _cuda_doc_ids(t: int = 384) -> torch.Tensor:
    lengths = [[1, 100, 1, 150, 2, 130], [384]]
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths]).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
@pytest.mark.parametrize("n_kv_heads", [8, 2])
@pytest.mark.parametrize("with_docs", [True, False], ids=["packed", "dense"])
def test_cuda_backend_matches_math(backend: str, n_kv_heads: int, with_docs: bool) -> None:
    if backend == "flash" and not flash_module.flash_installed():
        pytest.skip("flash-attn is not installed")
    q, k, v = _cuda_qkv(n_kv_heads)
    _assert_matches_math(backend, q, k, v, doc_ids=_cuda_doc_ids() if with_docs else None)


@pytest.mark.gpu
def test_cuda_auto_is_flash_when_installed() -> None:
    q, _, _ = _cuda_qkv(8)
    expected = "flash" if flash_module.flash_installed() else "sdpa"
    assert resolve_backend("auto", q.device, q.dtype, head_dim=q.shape[-1]) == expected


@pytest.mark.gpu
def test_cuda_compiled_model_matches_eager() -> None:
    torch.manual_seed(0)
    eager = build_model(_arch(d_model=128, n_heads=2, mlp_hidden=256), "cuda")
    compiled = build_model(_arch(d_model=128, n_heads=2, mlp_hidden=256, compile=True), "cuda")
    compiled.load_state_dict(eager.state_dict())
    ids, doc_ids = (x.cuda() for x in _ids())
    outs = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(ids, doc_ids=doc_ids)
        hidden.float().square().mean().backward()
        outs.append(hidden.float())
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)
    for p_eager, p_compiled in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------- Liger's loss path


def test_second_backward_through_the_loss_raises_instead_of_rescaling() -> None:
    hidden, weight, _, targets, tw = _loss_inputs(6)
    loss = masked_lm_loss(hidden, weight, targets, tw, chunk_size=4)
    torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, (hidden, weight))


def test_liger_on_cpu_is_a_clear_error_and_auto_falls_back_to_chunked() -> None:
    hidden, weight, bias, targets, tw = _loss_inputs(10)
    with pytest.raises(ValueError, match="impl='liger' cannot run"):
        masked_lm_loss(hidden, weight, targets, tw, bias=bias, impl="liger")
    auto = masked_lm_loss(hidden, weight, targets, tw, bias=bias, chunk_size=3)
    chunked = masked_lm_loss(hidden, weight, targets, tw, bias=bias, chunk_size=3, impl="chunked")
    torch.testing.assert_close(auto, chunked)
    with pytest.raises(ValueError, match="unknown loss impl"):
        masked_lm_loss(hidden, weight, targets, impl="triton")  # type: ignore[arg-type]


def _reference_liger(calls: list[dict[str, Any]]) -> Any:
    """liger_fused_linear_cross_entropy's contract, in plain torch: the glue is tested on CPU, Liger on CUDA."""

    def fn(
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        reduction: str = "mean",
        accum_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        calls.append({"reduction": reduction, "accum_dtype": accum_dtype})
        logits = (_input @ weight.T + (bias if bias is not None else 0)).float()
        return F.cross_entropy(logits, target, reduction=reduction)

    return fn


@pytest.mark.parametrize("weighted", [True, False])
def test_liger_glue_weights_rows_and_accumulates_in_fp32(monkeypatch: pytest.MonkeyPatch, weighted: bool) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(liger_module, "_function", lambda: _reference_liger(calls))
    hidden, weight, bias, targets, tw = _loss_inputs(10)
    token_weights = tw if weighted else None
    loss, rows = liger_module.liger_masked_lm_loss(hidden, weight, targets, token_weights, bias)
    naive = _naive(hidden, weight, targets, token_weights, bias)
    torch.testing.assert_close(loss, naive)
    for g, g_ref in zip(_grads(loss, (hidden, weight, bias)), _grads(naive, (hidden, weight, bias))):
        torch.testing.assert_close(g, g_ref)
    logits = (hidden @ weight.T + bias).float()
    torch.testing.assert_close(rows, F.cross_entropy(logits, targets, reduction="none").detach())
    assert not rows.requires_grad
    assert calls == [{"reduction": "none", "accum_dtype": torch.float32}]


def test_liger_releases_with_wrong_per_token_gradients_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(liger_module, "liger_installed", lambda: True)
    monkeypatch.setattr(liger_module, "per_token_backward_is_correct", lambda: False)
    on_cuda: Any = SimpleNamespace(device=torch.device("cuda"), shape=(4, 8))
    assert liger_module.liger_unsupported(on_cuda, None) is None  # unweighted sums are right in every release
    reason = liger_module.liger_unsupported(on_cuda, torch.ones(4))
    assert reason is not None and "Liger-Kernel#1298" in reason
    assert "CUDA only" in str(liger_module.liger_unsupported(torch.empty(4, 8, device="meta"), None))


@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_liger_matches_chunked(weighted: bool, dtype: torch.dtype) -> None:
    if not liger_module.liger_installed():
        pytest.skip("liger-kernel is not installed")
    hidden, weight, bias, targets, tw = (x.detach().cuda() for x in _loss_inputs(300, d=64, vocab=1000))
    hidden, weight, bias = (x.to(dtype).requires_grad_() for x in (hidden, weight, bias))
    token_weights = tw if weighted else None
    results = []
    for impl in ("liger", "chunked"):
        loss = masked_lm_loss(hidden, weight, targets, token_weights, bias=bias, chunk_size=64, impl=impl)
        results.append((loss, _grads(loss, (hidden, weight, bias))))
    (liger, liger_grads), (chunked, chunked_grads) = results
    tol = TOL[dtype]
    torch.testing.assert_close(liger, chunked, atol=tol * abs(chunked.item()), rtol=tol)
    for g, g_ref in zip(liger_grads, chunked_grads):
        assert g.dtype == g_ref.dtype == dtype
        torch.testing.assert_close(g.float(), g_ref.float(), atol=tol, rtol=tol)

"""The fused CUDA forward (kernels/cuda/flash_fwd_cuda.cuh) against an fp64 reference.

Runs only where a CUDA GPU of compute capability 8.0 or later is present and the build holds
the kernels; skipped with the reason otherwise. Every test turns the kernel on
(FUSEDATTN_CUDA_KERNEL=fused) and poisons the outputs with NaN before it runs
(FUSEDATTN_CUDA_POISON=1), so an element the kernel fails to write shows.

Tolerance, FlashAttention's rule: the kernel's largest error against the fp64 reference is at
most twice that of PyTorch computing the same formula in the same dtype (plus a hair for
cases where that error is 0).
"""
import math
import os

import pytest
import torch

import fusedattn
from conftest import reference_attention

if not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="no CUDA GPU: the fused CUDA kernel needs one to run")
elif not fusedattn._C._cuda_kernels_built():
    pytestmark = pytest.mark.skip(reason="this build has no CUDA kernels (no CUDA toolkit "
                                         "was found when it was built)")
elif torch.cuda.get_device_capability() < (8, 0):
    pytestmark = pytest.mark.skip(reason="the fused CUDA kernel needs compute capability 8.0+")

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _fused(monkeypatch):
    monkeypatch.setenv("FUSEDATTN_CUDA_KERNEL", "fused")
    monkeypatch.setenv("FUSEDATTN_CUDA_POISON", "1")


def inputs(B, H, Hk, L, S, E, Ev=None, dtype=torch.float16):
    Ev = E if Ev is None else Ev
    q = torch.randn(B, H, L, E, device="cuda", dtype=dtype)
    k = torch.randn(B, Hk, S, E, device="cuda", dtype=dtype)
    v = torch.randn(B, Hk, S, Ev, device="cuda", dtype=dtype)
    return q, k, v


def same_dtype_torch(q, k, v, attn_mask=None, key_padding_mask=None, is_causal=False,
                     bottom_right=False, scale=None):
    """The formula in q's dtype on the GPU (PyTorch's own error at this precision)."""
    H, Hk, L, S = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2]
    if Hk != H:
        k = k.repeat_interleave(H // Hk, dim=-3)
        v = v.repeat_interleave(H // Hk, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(*key_padding_mask.shape[:-1], 1, 1, S)
        if kpm.dtype == torch.bool:
            allowed = allowed & ~kpm
        else:
            s = s + kpm
    if is_causal:
        offset = S - L if bottom_right else 0
        idx = torch.arange(S, device=q.device)[None, :] <= torch.arange(L, device=q.device)[:, None] + offset
        allowed = allowed & idx
    s = s.masked_fill(~allowed.expand_as(s), -math.inf)
    p = torch.softmax(s.float(), -1).to(q.dtype)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v, p


def check(q, k, v, **kw):
    """fusedattn (fused) vs fp64 reference, with twice torch's same-dtype error allowed."""
    bottom_right = kw.pop("bottom_right", False)
    out, w, lse = fusedattn.attention(
        q, k, v, causal_alignment="bottom_right" if bottom_right else "top_left",
        return_weights=True, return_lse=True, **kw)
    torch.cuda.synchronize()
    args = dict(attn_mask=kw.get("attn_mask"), key_padding_mask=kw.get("key_padding_mask"),
                is_causal=kw.get("is_causal", False), bottom_right=bottom_right, scale=kw.get("scale"))
    cpu = {n: (t.cpu() if torch.is_tensor(t) else t) for n, t in args.items()}
    ref_out, ref_w = reference_attention(q.cpu(), k.cpu(), v.cpu(), **cpu)
    pt_out, pt_w = same_dtype_torch(q, k, v, **args)
    assert not out.isnan().any() and not w.isnan().any(), "unwritten (NaN-poisoned) elements"
    for name, got, pt, ref in (("out", out, pt_out, ref_out), ("weights", w, pt_w, ref_w)):
        err = (got.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
        pt_err = (pt.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
        assert err <= 2 * pt_err + 1e-4, f"{name}: error {err:.3g} vs torch's {pt_err:.3g}"
    # lse against the reference path's (fp32 scores, at::logsumexp); -inf where nothing is seen.
    os.environ["FUSEDATTN_CUDA_KERNEL"] = "reference"
    try:
        _, _, ref_lse = fusedattn.attention(
            q, k, v, causal_alignment="bottom_right" if bottom_right else "top_left",
            return_lse=True, **kw)
    finally:
        os.environ["FUSEDATTN_CUDA_KERNEL"] = "fused"
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())
    seen = ~ref_lse.isneginf()
    torch.testing.assert_close(lse[seen], ref_lse[seen], atol=2e-2, rtol=1e-3)
    return out, w, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [40, 64, 80, 128, 256])
@pytest.mark.parametrize("L,S", [(1, 1), (17, 129), (129, 17), (1000, 1000), (1, 1000), (129, 1000)])
def test_plain(dtype, E, L, S):
    check(*inputs(2, 3, 3, L, S, E, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bottom_right", [False, True])
@pytest.mark.parametrize("L,S", [(17, 129), (129, 17), (1000, 1000), (1, 1000)])
def test_causal(dtype, bottom_right, L, S):
    check(*inputs(2, 4, 4, L, S, 64, dtype=dtype), is_causal=True, bottom_right=bottom_right)


def masks(B, H, L, S, dtype):
    dev = "cuda"
    yield "bool (L, S)", dict(attn_mask=torch.rand(L, S, device=dev) > 0.3)
    yield "bool (B, H, L, S) transposed", dict(
        attn_mask=(torch.rand(B, H, S, L, device=dev) > 0.3).transpose(-1, -2))
    yield "bool (B, 1, 1, S)", dict(attn_mask=torch.rand(B, 1, 1, S, device=dev) > 0.2)
    yield "float (B, H, L, S)", dict(attn_mask=torch.randn(B, H, L, S, device=dev, dtype=dtype))
    yield "float (H, 1, S)", dict(attn_mask=torch.randn(H, 1, S, device=dev, dtype=dtype))
    yield "float with -inf", dict(attn_mask=torch.where(
        torch.rand(L, S, device=dev) > 0.5, 0.0, -math.inf).to(dtype))
    yield "key padding bool", dict(key_padding_mask=torch.rand(B, S, device=dev) > 0.7)
    yield "key padding float", dict(key_padding_mask=torch.randn(B, S, device=dev, dtype=dtype))
    yield "bool + key padding + causal", dict(
        attn_mask=torch.rand(L, S, device=dev) > 0.2, key_padding_mask=torch.rand(B, S, device=dev) > 0.8,
        is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(9))
@pytest.mark.parametrize("L,S", [(17, 129), (129, 1000), (1000, 17)])
def test_masks(dtype, case, L, S):
    B, H = 2, 3
    name, kw = list(masks(B, H, L, S, dtype))[case]
    check(*inputs(B, H, H, L, S, 80, dtype=dtype), **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_scale_and_value_dim(dtype, causal):
    q, k, v = inputs(2, 8, 2, 129, 257, 64, Ev=40, dtype=dtype)
    check(q, k, v, enable_gqa=True, is_causal=causal, scale=0.3)


def test_unaligned_and_strided_inputs():
    # (B, L, H, E) memory seen as (B, H, L, E): row stride H * E; and E = 20 (not a multiple
    # of 8) and a storage offset of one element, both of which the launcher must copy.
    x = torch.randn(2, 129, 4, 3 * 64, device="cuda", dtype=torch.float16)
    q, k, v = (t.transpose(1, 2) for t in x.split(64, dim=-1))
    check(q, k, v)
    base = torch.randn(2 * 3 * 33 * 20 + 1, device="cuda", dtype=torch.float16)
    q = base[1:].view(2, 3, 33, 20)
    check(q, q, q)


def test_fully_masked_rows_give_zero():
    q, k, v = inputs(1, 2, 2, 70, 33, 64)
    mask = torch.rand(70, 33, device="cuda") > 0.5
    mask[5] = False
    out, w, lse = check(q, k, v, attn_mask=mask)
    assert (out[:, :, 5] == 0).all() and (w[:, :, 5] == 0).all() and lse[:, :, 5].isneginf().all()
    # bottom-right with L > S: the first L - S queries see nothing.
    out, w, lse = check(q, k, v, is_causal=True, bottom_right=True)
    assert (out[:, :, :37] == 0).all() and lse[:, :, :37].isneginf().all()


def test_empty():
    q, k, v = inputs(2, 2, 2, 0, 5, 64)
    assert fusedattn.attention(q, k, v).shape == (2, 2, 0, 64)
    q, k, v = inputs(2, 2, 2, 7, 0, 64)
    out, w, lse = fusedattn.attention(q, k, v, return_weights=True, return_lse=True)
    assert (out == 0).all() and w.shape == (2, 2, 7, 0) and lse.isneginf().all()


def test_fp32_takes_the_reference():
    q, k, v = inputs(2, 2, 2, 33, 40, 64, dtype=torch.float32)
    ref, _ = reference_attention(q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(fusedattn.attention(q, k, v).cpu().double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_matches_the_reference_mask(dtype, monkeypatch):
    # Both paths draw the seed from the CUDA generator and the mask from dropout.h's counters.
    q, k, v = inputs(2, 3, 3, 129, 200, 64, dtype=dtype)
    torch.manual_seed(7)
    fused = fusedattn.attention(q, k, v, dropout_p=0.3, is_causal=True)
    monkeypatch.setenv("FUSEDATTN_CUDA_KERNEL", "reference")
    torch.manual_seed(7)
    ref = fusedattn.attention(q, k, v, dropout_p=0.3, is_causal=True)
    torch.testing.assert_close(fused, ref, atol=2e-2, rtol=2e-2)
    torch.manual_seed(8)
    monkeypatch.setenv("FUSEDATTN_CUDA_KERNEL", "fused")
    other = fusedattn.attention(q, k, v, dropout_p=0.3, is_causal=True)
    assert not torch.equal(other, fused)


def test_dropout_statistics():
    # v = 1 everywhere: each output is sum_j keep_j p_j / (1 - p), mean 1 over many rows.
    q, k, _ = inputs(4, 8, 8, 256, 256, 64)
    v = torch.ones(4, 8, 256, 64, device="cuda", dtype=torch.float16)
    out = fusedattn.attention(q, k, v, dropout_p=0.25)
    assert abs(out.float().mean().item() - 1.0) < 0.02
    assert fusedattn.attention(q, k, v, dropout_p=1.0).abs().max().item() == 0.0


def test_dropout_under_cuda_graph_draws_per_replay():
    q, k, v = inputs(1, 2, 2, 64, 64, 64)
    static_out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        static_out.copy_(fusedattn.attention(q, k, v, dropout_p=0.5))  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(fusedattn.attention(q, k, v, dropout_p=0.5))
    graph.replay()
    first = static_out.clone()
    graph.replay()
    assert not torch.equal(first, static_out), "the captured graph reused one dropout seed"
    assert not first.isnan().any()


VARIANTS = [
    dict(window=(37, 0)), dict(window=(100, 20), is_causal=True), dict(window=(-1, 3)),
    dict(alibi=True), dict(alibi=True, is_causal=True), dict(softcap=5.0),
    dict(rel_bias=6), dict(rel_bias=200, window=(64, 64), softcap=2.0, alibi=True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(VARIANTS)))
@pytest.mark.parametrize("bottom_right", [False, True])
def test_variants_against_fp64(dtype, case, bottom_right):
    """window, ALiBi, softcap and rel_bias in the fused kernel (values, weights, lse) against
    the same call in fp64 on the CPU (whose kernels the variants tests check against the
    formulas); a window that skips whole key tiles, and one wider than a tile."""
    B, H, Hk, L, S = 2, 4, 2, 129, 300
    kw = dict(VARIANTS[case])
    g = torch.Generator().manual_seed(case)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(B, H, generator=g)
    if "rel_bias" in kw:
        kw["rel_bias"] = torch.randn(H, 2 * kw["rel_bias"] + 1, generator=g)
    q, k, v = inputs(B, H, Hk, L, S, 64, dtype=dtype)
    align = "bottom_right" if bottom_right else "top_left"
    dev = {n: (t.cuda() if torch.is_tensor(t) else t) for n, t in kw.items()}
    out, w, lse = fusedattn.attention(q, k, v, enable_gqa=True, causal_alignment=align,
                                      return_weights=True, return_lse=True, **dev)
    torch.cuda.synchronize()
    ref, ref_w, ref_lse = fusedattn.attention(
        q.cpu().double(), k.cpu().double(), v.cpu().double(), enable_gqa=True,
        causal_alignment=align, return_weights=True, return_lse=True,
        **{n: (t.double() if torch.is_tensor(t) and n == "rel_bias" else t) for n, t in kw.items()})
    assert not out.isnan().any() and not w.isnan().any(), "unwritten (NaN-poisoned) elements"
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(w.double().cpu(), ref_w, atol=tol, rtol=tol)
    assert torch.equal(lse.isneginf().cpu(), ref_lse.isneginf())
    seen = ~ref_lse.isneginf()
    torch.testing.assert_close(lse.cpu().double()[seen], ref_lse[seen], atol=2e-2, rtol=1e-3)


def test_varlen_on_cuda_equals_each_sequence():
    lengths = [5, 0, 130, 1, 77]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    out = fusedattn.attention_varlen(q, q, q, cu, cu, 130, 130, is_causal=True, window=(20, 0))
    out.float().sum().backward()
    for b, n in enumerate(lengths):
        s = slice(int(cu[b]), int(cu[b + 1]))
        x = q.detach()[s].transpose(0, 1)
        one = fusedattn.attention(x, x, x, is_causal=True, window=(20, 0))
        torch.testing.assert_close(out[s].transpose(0, 1), one)
    assert q.grad is not None and not q.grad.isnan().any()


def module_pair():
    """fusedattn's and torch's MultiheadAttention with the same weights, fp16 on the GPU, an
    input that requires grad and a key padding mask."""
    mha = fusedattn.MultiheadAttention(128, 8, batch_first=True).cuda().half()
    ref = torch.nn.MultiheadAttention(128, 8, batch_first=True).cuda().half()
    ref.load_state_dict(mha.state_dict())
    x = torch.randn(4, 37, 128, device="cuda", dtype=torch.float16, requires_grad=True)
    kpm = torch.rand(4, 37, device="cuda") > 0.7
    kpm[:, 0] = False
    return mha, ref, x, kpm


def test_module_and_backward_through_reference():
    mha, ref, x, kpm = module_pair()
    out, w = mha(x, x, x, key_padding_mask=kpm)
    ref_out, ref_w = ref(x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref_out, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(w, ref_w, atol=5e-3, rtol=5e-3)
    out.float().sum().backward()  # the backward: the ATen reference
    assert x.grad is not None and not x.grad.isnan().any()


def test_opcheck_cuda():
    q, k, v = inputs(2, 4, 2, 9, 13, 64)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.fusedattn.attention.default, (q, k, v), dict(
        enable_gqa=True, is_causal=True, key_padding_mask=torch.rand(2, 13, device="cuda") > 0.8,
        return_weights=True))


def test_sanitizer_cases():
    """Small calls covering every code path, for scripts/cuda_sanitize.sh (memcheck, racecheck)."""
    for dtype in DTYPES:
        for E in (40, 64, 128, 256):
            q, k, v = inputs(1, 2, 1, 67, 45, E, dtype=dtype)
            check(q, k, v, enable_gqa=True)
            check(q, k, v, enable_gqa=True, is_causal=True, bottom_right=True,
                  attn_mask=torch.rand(67, 45, device="cuda") > 0.3,
                  key_padding_mask=torch.randn(1, 45, device="cuda", dtype=dtype))
            fusedattn.attention(q, k, v, enable_gqa=True, dropout_p=0.2)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hk,T,E,Ev,C,lengths", [
    (3, 4, 4, 1, 64, 64, 300, [0, 7, 290]),   # an empty sequence, ragged
    (1, 8, 2, 5, 80, 48, 5000, [4800]),       # GQA, long: split across blocks
    (2, 2, 1, 16, 256, 256, 700, [600, 40]),  # the widest head dim, 16 new tokens
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kpm_kind", [None, "bool", "float"])
def test_kv_cache_decode_kernel_matches_the_aten_path(monkeypatch, dtype, B, H, Hk, T, E, Ev,
                                                      C, lengths, causal, kpm_kind):
    op = torch.ops.fusedattn.kv_cache_attention
    kc = torch.randn(B, Hk, C, E, device="cuda", dtype=dtype)
    vc = torch.randn(B, Hk, C, Ev, device="cuda", dtype=dtype)
    q = torch.randn(B, H, T, E, device="cuda", dtype=dtype)
    k = torch.randn(B, Hk, T, E, device="cuda", dtype=dtype)
    v = torch.randn(B, Hk, T, Ev, device="cuda", dtype=dtype)
    kpm = None
    if kpm_kind is not None:
        kpm = torch.rand(B, C // 2, device="cuda") < 0.2
        if kpm_kind == "float":
            kpm = torch.where(kpm, -math.inf, 0.5).to(dtype)
    n = torch.tensor(lengths, device="cuda")
    kw = dict(is_causal=causal, key_padding_mask=kpm, enable_gqa=H != Hk, return_lse=True)
    kc2, vc2, n2 = kc.clone(), vc.clone(), n.clone()
    out, lse, _ = op(q, k, v, kc, vc, n, **kw)
    monkeypatch.setenv("FUSEDATTN_CUDA_KERNEL", "reference")
    ref, ref_lse, _ = op(q.double(), k.double(), v.double(), kc2.double(), vc2.double(), n2, **kw)
    assert torch.equal(n, n2) and torch.equal(kc, kc2)
    seen = ref_lse > -math.inf
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=tol * 4, rtol=tol)
    assert torch.equal(lse > -math.inf, seen)


@pytest.mark.parametrize("kernel", ["fused", None])  # None: the default route (torch's SDPA)
def test_kv_cache_module_decoding_on_cuda(monkeypatch, kernel):
    if kernel is None:
        monkeypatch.delenv("FUSEDATTN_CUDA_KERNEL")
    m = fusedattn.MultiheadAttention(64, 4, batch_first=True).cuda().eval()
    x = torch.randn(2, 9, 64, device="cuda")
    with torch.no_grad():
        full = m(x, x, x, is_causal=True)[0]
        cache = m.kv_cache(2, 16)
        inc = torch.cat([m(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache,
                           is_causal=True, need_weights=False)[0] for t in range(9)], 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


# The default route on CUDA (no FUSEDATTN_CUDA_KERNEL): torch's SDPA for what it serves.

@pytest.fixture
def default_route(monkeypatch):
    monkeypatch.delenv("FUSEDATTN_CUDA_KERNEL", raising=False)
    monkeypatch.delenv("FUSEDATTN_CUDA_POISON", raising=False)
    monkeypatch.delenv("FUSEDATTN_ROUTE", raising=False)


def routed_check(q, k, v, grads=True, **kw):
    """The default route against the fp64 formula (twice torch's same-dtype error allowed) and,
    for the gradients, against fusedattn's reference on the same GPU."""
    assert fusedattn.explain(q, k, v, **kw).startswith("torch:")
    bottom_right = kw.get("causal_alignment") == "bottom_right"
    args = dict(attn_mask=kw.get("attn_mask"), key_padding_mask=kw.get("key_padding_mask"),
                is_causal=kw.get("is_causal", False), bottom_right=bottom_right, scale=kw.get("scale"))
    x = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    out = fusedattn.attention(*x, **kw)
    assert not out.isnan().any()
    ref, _ = reference_attention(q.cpu(), k.cpu(), v.cpu(),
                                 **{n: (t.cpu() if torch.is_tensor(t) else t) for n, t in args.items()})
    pt, _ = same_dtype_torch(q, k, v, **args)
    err = (out.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    pt_err = (pt.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= 2 * pt_err + 1e-4, f"out: error {err:.3g} vs torch's {pt_err:.3g}"
    if not grads:
        return out
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, x, g)
    os.environ["FUSEDATTN_CUDA_KERNEL"] = "reference"
    try:
        y = [t.detach().double().requires_grad_() for t in (q, k, v)]
        dkw = {n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t) for n, t in kw.items()}
        want = torch.autograd.grad(fusedattn.attention(*y, **dkw), y, g.double())
    finally:
        del os.environ["FUSEDATTN_CUDA_KERNEL"]
    tol = 1e-4 if q.dtype == torch.float32 else 5e-2
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "kpm_bool", "kpm_float", "float+kpm_bool"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(77, 130), (130, 77), (256, 256)])
def test_default_route_values_and_gradients(default_route, dtype, mask, causal, L, S):
    B, H, Hk, E = 2, 4, 2, 64
    q, k, v = inputs(B, H, Hk, L, S, E, dtype=dtype)
    kw = dict(enable_gqa=True, is_causal=causal is not None, causal_alignment=causal or "top_left")
    if mask.split("+")[0] == "bool":
        kw["attn_mask"] = torch.rand(L, S, device="cuda") > 0.3
    elif mask.split("+")[0] == "float":
        kw["attn_mask"] = torch.randn(B, 1, L, S, device="cuda", dtype=dtype)
    if "kpm_bool" in mask:
        kw["key_padding_mask"] = torch.rand(B, S, device="cuda") < 0.3
    elif "kpm_float" in mask:
        kw["key_padding_mask"] = torch.where(torch.rand(B, S, device="cuda") < 0.3, -math.inf, 0.5).to(dtype)
    routed_check(q, k, v, **kw)


def test_default_route_fully_masked_rows_give_zero(default_route):
    """torch's kernels (cuDNN, efficient) on rows with no visible key: 0, never NaN."""
    for dtype in DTYPES:
        q, k, v = inputs(2, 2, 2, 70, 33, 64, dtype=dtype)
        mask = torch.rand(70, 33, device="cuda") > 0.5
        mask[5] = False
        out = routed_check(q, k, v, attn_mask=mask)
        assert (out[:, :, 5] == 0).all()
        kpm = torch.zeros(2, 33, dtype=torch.bool, device="cuda")
        kpm[1] = True
        out = routed_check(q, k, v, key_padding_mask=kpm)
        assert (out[1] == 0).all()
        out = routed_check(q, k, v, is_causal=True, causal_alignment="bottom_right")
        assert (out[:, :, :37] == 0).all()


def test_default_route_keeps_what_torch_cannot_give(default_route):
    q, k, v = inputs(1, 2, 2, 9, 9, 64)
    assert "return_weights" in fusedattn.explain(q, k, v, return_weights=True)
    assert "window" in fusedattn.explain(q, k, v, window=(2, 0))
    out, w, lse = fusedattn.attention(q, k, v, return_weights=True, return_lse=True)
    assert w.shape == (1, 2, 9, 9) and lse.shape == (1, 2, 9)


def test_default_route_long_sequence_with_key_padding(default_route):
    """16k keys with key padding: no (B, H, L, S) tensor, so it fits where the reference would not."""
    B, H, L, E = 1, 16, 16384, 128
    q, k, v = inputs(B, H, H, L, L, E, dtype=torch.bfloat16)
    kpm = torch.arange(L, device="cuda")[None] >= L - 100
    torch.cuda.reset_peak_memory_stats()
    out = fusedattn.attention(q, k, v, key_padding_mask=kpm, is_causal=True)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert torch.cuda.max_memory_allocated() < 4 * q.numel() * q.element_size() + (1 << 30)


def test_default_route_dropout(default_route):
    q, k, v = inputs(2, 4, 4, 128, 128, 64)
    torch.manual_seed(3)
    a = fusedattn.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = fusedattn.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not a.isnan().any()


def test_default_route_module_and_varlen(default_route):
    mha, ref, x, kpm = module_pair()
    out, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    ref_out, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out, ref_out, atol=5e-3, rtol=5e-3)
    out.float().sum().backward()
    assert x.grad is not None and not x.grad.isnan().any()
    # Packed sequences: each one as its own call.
    lengths = [5, 0, 130, 1, 77]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    z = torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.float16)
    packed = fusedattn.attention_varlen(z, z, z, cu, cu, 130, 130, is_causal=True)
    for b in range(len(lengths)):
        s = slice(int(cu[b]), int(cu[b + 1]))
        one = z[s].transpose(0, 1)
        torch.testing.assert_close(packed[s].transpose(0, 1), fusedattn.attention(one, one, one, is_causal=True))

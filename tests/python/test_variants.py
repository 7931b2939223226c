"""Attention variants on the fused path: sliding windows, ALiBi and logit soft-capping, alone
and with every existing option, forward and backward, against an fp64 reference written from
the formulas (not from the op's own reference path)."""
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

import fusedattn


def formula(q, k, v, *, window=None, alibi=None, softcap=None, attn_mask=None, kpm=None,
            is_causal=False, bottom_right=False, scale=None, gqa=False):
    """fp64: s = scale q.k, soft-capped, + ALiBi + float masks; bool masks, key padding,
    causal and the window remove keys; fully removed rows give 0."""
    q, k, v = q.double(), k.double(), v.double()
    if gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    L, S = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    o = S - L if bottom_right else 0
    rel = torch.arange(S)[None, :] - (torch.arange(L)[:, None] + o)  # j - (i + o)
    if alibi is not None:
        slopes = alibi.double()
        slopes = slopes.reshape(*([1] * (q.dim() - 3)), -1, 1, 1) if alibi.dim() == 1 else slopes[..., None, None]
        s = s - slopes * rel.abs()
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask.double()
    if kpm is not None and kpm.dtype != torch.bool:
        s = s + kpm.double()[..., None, None, :]
    keep = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        keep &= rel <= 0
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= rel >= -left
        if right >= 0:
            keep &= rel <= right
    keep = keep.expand(s.shape).clone()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep &= attn_mask.expand(s.shape)
    if kpm is not None and kpm.dtype == torch.bool:
        keep &= ~kpm[..., None, None, :].expand(s.shape)
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None]).masked_fill(~keep, 0)
    return p @ v, lse


def rand(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def check(q, k, v, atol, **kw):
    """Values, lse and gradients against the formula."""
    out, _, lse = fusedattn.attention(
        q, k, v, return_lse=True, window=kw.get("window"), alibi_slopes=kw.get("alibi"),
        softcap=kw.get("softcap"), attn_mask=kw.get("attn_mask"), key_padding_mask=kw.get("kpm"),
        is_causal=kw.get("is_causal", False), scale=kw.get("scale"), enable_gqa=kw.get("gqa", False),
        causal_alignment="bottom_right" if kw.get("bottom_right") else "top_left")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = formula(qd, kd, vd, **kw)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=atol, rtol=atol)
    assert torch.isneginf(lse[~finite]).all()
    g = torch.randn_like(ref)
    out.backward(g.to(out.dtype))
    ref.backward(g)
    for got, want, name in ((q.grad, qd.grad, "dq"), (k.grad, kd.grad, "dk"), (v.grad, vd.grad, "dv")):
        torch.testing.assert_close(got.double(), want, atol=atol * 4, rtol=atol * 4, msg=name)


WINDOWS = [(0, 0), (3, 0), (0, 2), (5, 5), (-1, 4), (7, -1), (600, 0), (2, 700)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("bottom_right", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_window(window, bottom_right, causal):
    torch.manual_seed(0)
    q, k, v = rand(2, 3, 37, 16), rand(2, 3, 45, 16), rand(2, 3, 45, 8)
    check(q, k, v, 2e-5, window=window, bottom_right=bottom_right, is_causal=causal)


@pytest.mark.parametrize("L,S", [(700, 700), (1100, 900), (130, 1500)])
def test_window_cuts_blocks(L, S):
    # Windows that start and end inside the 512-key forward / 256-key backward blocks.
    torch.manual_seed(1)
    q, k, v = rand(1, 2, L, 32), rand(1, 2, S, 32), rand(1, 2, S, 32)
    check(q, k, v, 3e-5, window=(300, 40), bottom_right=True)
    q.grad = k.grad = v.grad = None
    check(q, k, v, 3e-5, window=(257, 0), is_causal=True)


@pytest.mark.parametrize("shape", ["heads", "batch"])
@pytest.mark.parametrize("bottom_right", [False, True])
def test_alibi(shape, bottom_right):
    torch.manual_seed(2)
    q, k, v = rand(2, 4, 19, 8), rand(2, 4, 23, 8), rand(2, 4, 23, 6)
    slopes = torch.tensor([2 ** -(8 * (h + 1) / 4) for h in range(4)])
    if shape == "batch":
        slopes = torch.stack([slopes, slopes * 0.5])
    check(q, k, v, 2e-5, alibi=slopes, bottom_right=bottom_right)


@pytest.mark.parametrize("cap", [0.5, 5.0, 50.0])
def test_softcap(cap):
    torch.manual_seed(3)
    q, k, v = rand(2, 3, 21, 16) * 3, rand(2, 3, 29, 16) * 3, rand(2, 3, 29, 8)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    check(q, k, v, 2e-5, softcap=cap)


COMBOS = list(itertools.product([None, (4, 1)], [False, True], [None, 2.0], ["none", "bool", "float", "kpm"]))


@pytest.mark.parametrize("window,alibi,softcap,mask", COMBOS)
def test_combinations_with_masks(window, alibi, softcap, mask):
    torch.manual_seed(4)
    q, k, v = rand(2, 4, 17, 8), rand(2, 2, 20, 8), rand(2, 2, 20, 5)
    kw = dict(window=window, softcap=softcap, gqa=True, is_causal=window is None, bottom_right=True)
    if alibi:
        kw["alibi"] = torch.rand(4)
    if mask == "bool":
        m = torch.rand(17, 20) > 0.3
        m[:, -1] = True
        kw["attn_mask"] = m
    elif mask == "float":
        kw["attn_mask"] = torch.randn(17, 20)
    elif mask == "kpm":
        pad = torch.zeros(2, 20, dtype=torch.bool)
        pad[1, 12:] = True
        kw["kpm"] = pad
    check(q, k, v, 2e-5, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_against_sdpa_error(dtype):
    # Half types: within 2x of PyTorch's own error (SDPA with the equivalent float mask, same
    # dtype) against fp64, plus a quarter epsilon.
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 4, 77, 32, dtype=dtype) for _ in range(3))
    slopes = torch.rand(4)
    kw = dict(window=(20, 3), alibi=slopes, softcap=8.0)
    out = fusedattn.attention(q, k, v, window=(20, 3), alibi_slopes=slopes, softcap=8.0)
    ref, _ = formula(q, k, v, **kw)
    # The same scores as a float mask for SDPA (softcap has no SDPA form: compare to fp64 only).
    err = (out.double() - ref).abs().max().item()
    eps = torch.finfo(dtype).eps
    if dtype in (torch.float64, torch.float32):
        assert err < 50 * eps, err
    else:
        rel = torch.arange(77)[None] - torch.arange(77)[:, None]
        keep = (rel >= -20) & (rel <= 3)
        bias = (-slopes[:, None, None] * rel.abs()).masked_fill(~keep, -math.inf)
        # SDPA cannot softcap: its reference error uses the same problem without it.
        sd = F.scaled_dot_product_attention(q, k, v, bias.to(dtype))
        sd_ref, _ = formula(q, k, v, window=(20, 3), alibi=slopes)
        torch_err = (sd.double() - sd_ref).abs().max().item()
        assert err <= 2 * torch_err + eps / 4, (err, torch_err)


def test_dropout_weights_and_averaging_with_variants():
    torch.manual_seed(6)
    q, k, v = rand(2, 3, 15, 8, grad=False), rand(2, 3, 18, 8, grad=False), rand(2, 3, 18, 8, grad=False)
    kw = dict(window=(3, 2), alibi_slopes=torch.rand(3), softcap=3.0)
    out, w, lse = fusedattn.attention(q, k, v, return_weights=True, return_lse=True, **kw)
    _, w_avg, _ = fusedattn.attention(q, k, v, return_weights=True, average_weights=True, **kw)
    torch.testing.assert_close(w_avg, w.mean(1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, w @ v, atol=1e-5, rtol=1e-5)
    # Window holes are exact zeros in the weights.
    rel = torch.arange(18)[None] - torch.arange(15)[:, None]
    assert (w[..., (rel < -3) | (rel > 2)] == 0).all()
    # Dropout: the same seed twice gives the same result, and the reference path agrees.
    torch.manual_seed(7)
    a = fusedattn.attention(q, k, v, dropout_p=0.3, **kw)
    torch.manual_seed(7)
    b = fusedattn.attention(q, k, v, dropout_p=0.3, **kw)
    assert torch.equal(a, b)


def test_reference_path_agrees(monkeypatch):
    torch.manual_seed(8)
    q, k, v = rand(1, 2, 33, 8), rand(1, 2, 41, 8), rand(1, 2, 41, 8)
    kw = dict(window=(6, 2), alibi_slopes=torch.rand(2), softcap=4.0, is_causal=True,
              causal_alignment="bottom_right")
    fused = fusedattn.attention(q, k, v, **kw)
    fused.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "reference")
    ref = fusedattn.attention(q, k, v, **kw)
    ref.sum().backward()
    torch.testing.assert_close(fused, ref, atol=2e-6, rtol=2e-6)
    for a, b in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_float_mask_gradient_with_variants():
    # A float mask's gradient takes the reference backward: the variants apply there too.
    torch.manual_seed(9)
    q, k, v = rand(1, 2, 9, 8, dtype=torch.float64), rand(1, 2, 11, 8, dtype=torch.float64), \
        rand(1, 2, 11, 8, dtype=torch.float64)
    m = torch.randn(9, 11, dtype=torch.float64, requires_grad=True)
    kw = dict(window=(2, 2), alibi_slopes=torch.rand(2), softcap=3.0)
    assert torch.autograd.gradcheck(
        lambda q, k, v, m: fusedattn.attention(q, k, v, m, **kw), (q, k, v, m))


@pytest.mark.parametrize("kw", [dict(window=(3, 1)), dict(alibi_slopes=torch.rand(2)), dict(softcap=2.0),
                                dict(window=(2, -1), alibi_slopes=torch.rand(2), softcap=1.5, is_causal=True)])
def test_gradcheck_fp64(kw):
    torch.manual_seed(10)
    q, k, v = (torch.randn(1, 2, n, 6, dtype=torch.float64, requires_grad=True) for n in (7, 9, 9))
    assert torch.autograd.gradcheck(lambda q, k, v: fusedattn.attention(q, k, v, **kw), (q, k, v))


def test_opcheck_and_compile():
    torch.manual_seed(11)
    q, k, v = (torch.randn(2, 2, n, 8, requires_grad=True) for n in (10, 12, 12))
    slopes = torch.rand(2)
    args = (q, k, v, None, 0.0, True, None, False)
    kwargs = dict(key_padding_mask=None, causal_alignment="bottom_right", return_weights=False,
                  return_lse=True, average_weights=False, window=[3, 1], alibi_slopes=slopes,
                  softcap=2.5)
    torch.library.opcheck(torch.ops.fusedattn.attention, args, kwargs)
    f = torch.compile(lambda q, k, v: fusedattn.attention(
        q, k, v, is_causal=True, window=(3, 1), alibi_slopes=slopes, softcap=2.5), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), fusedattn.attention(
        q, k, v, is_causal=True, window=(3, 1), alibi_slopes=slopes, softcap=2.5))


def test_fully_removed_rows():
    # A window that leaves some queries no key: 0 output, lse -inf, 0 gradients.
    torch.manual_seed(12)
    q, k, v = rand(1, 1, 8, 4), rand(1, 1, 4, 4), rand(1, 1, 4, 4)
    out, _, lse = fusedattn.attention(q, k, v, window=(0, 0), return_lse=True)
    assert (out[0, 0, 4:] == 0).all() and torch.isneginf(lse[0, 0, 4:]).all()
    out.sum().backward()
    assert (q.grad[0, 0, 4:] == 0).all()


@pytest.mark.parametrize("kw,match", [
    (dict(window=(1,)), "window must be (left, right)"),
    (dict(window=(-2, 0)), "window must be (left, right)"),
    (dict(alibi_slopes=torch.rand(3, dtype=torch.float64)), "alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.rand(5)), "alibi_slopes must have shape (H,) or (..., H)"),
    (dict(alibi_slopes=torch.rand(3, 2)), "alibi_slopes must have shape"),
    (dict(softcap=0.0), "softcap must be positive and finite"),
    (dict(softcap=float("inf")), "softcap must be positive and finite"),
])
def test_bad_variant_arguments_are_named(kw, match):
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    with pytest.raises(RuntimeError, match=re.escape(match)):
        fusedattn.attention(q, k, v, **kw)


# ---------------------------------------------------------------- rel_bias
def formula_rel(q, k, v, table, bottom_right=False, **kw):
    """The formula with the rel_bias entries as an explicit float mask (fp64)."""
    L, S = q.shape[-2], k.shape[-2]
    D = (table.shape[1] - 1) // 2
    o = S - L if bottom_right else 0
    rel = torch.arange(S)[None, :] - (torch.arange(L)[:, None] + o)
    bias = table.double()[:, (rel.clamp(-D, D) + D)]  # (H, L, S)
    mask = kw.pop("attn_mask", None)
    if mask is not None:
        bias = bias + mask.double() if mask.dtype != torch.bool else bias.masked_fill(~mask, -math.inf)
    return formula(q, k, v, attn_mask=bias, bottom_right=bottom_right, **kw)


@pytest.mark.parametrize("D", [1, 4, 40])
@pytest.mark.parametrize("bottom_right", [False, True])
@pytest.mark.parametrize("extra", [{}, dict(is_causal=True), dict(window=(6, 3)), dict(softcap=3.0, alibi=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rel_bias_values_and_gradients(D, bottom_right, extra, dtype):
    torch.manual_seed(13)
    L, S = 23, 31
    q, k, v = rand(2, 3, L, 8, dtype=dtype), rand(2, 3, S, 8, dtype=dtype), rand(2, 3, S, 6, dtype=dtype)
    table = torch.randn(3, 2 * D + 1, dtype=dtype, requires_grad=True)
    kw = dict(extra)
    alibi = torch.rand(3) if kw.pop("alibi", False) else None
    out = fusedattn.attention(q, k, v, rel_bias=table, alibi_slopes=alibi,
                              causal_alignment="bottom_right" if bottom_right else "top_left",
                              **kw)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref, _ = formula_rel(*leaves, bottom_right=bottom_right, alibi=alibi, **kw)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    for got, want in zip((q.grad, k.grad, v.grad, table.grad), (t.grad for t in leaves)):
        torch.testing.assert_close(got.double(), want, atol=tol * 10, rtol=tol * 10)
    assert table.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rel_bias_half_types(dtype):
    torch.manual_seed(14)
    q, k, v = (torch.randn(2, 4, 65, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    table = torch.randn(4, 21, dtype=dtype, requires_grad=True)
    out = fusedattn.attention(q, k, v, rel_bias=table, is_causal=True)
    out.float().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref, _ = formula_rel(*leaves, is_causal=True)
    ref.sum().backward()
    err = (out.double() - ref).abs().max().item()
    assert err < 2e-2, err
    g_err = (table.grad.double() - leaves[3].grad).abs().max() / leaves[3].grad.abs().max()
    assert g_err < 2e-2, g_err


def test_rel_bias_gradcheck_and_opcheck():
    torch.manual_seed(15)
    q, k, v = (torch.randn(1, 2, n, 5, dtype=torch.float64, requires_grad=True) for n in (6, 8, 8))
    table = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: fusedattn.attention(q, k, v, rel_bias=t, window=(3, 1)), (q, k, v, table))
    args = (q.float(), k.float(), v.float(), None, 0.0, False, None, False)
    torch.library.opcheck(torch.ops.fusedattn.attention, args, dict(
        key_padding_mask=None, causal_alignment="top_left", return_weights=False, return_lse=False,
        average_weights=False, window=None, alibi_slopes=None, softcap=None,
        rel_bias=table.detach().float().requires_grad_()))


def test_t5_bucketed_bias():
    """T5's bucketed relative bias through rel_bias equals it added as an L x S mask."""
    torch.manual_seed(16)
    H, buckets, max_distance, L = 4, 32, 20, 50

    def t5_bucket(rel, bidirectional=True, num_buckets=buckets):  # rel = j - i, per the paper
        n = -rel
        out = torch.zeros_like(n)
        if bidirectional:
            num_buckets //= 2
            out += (n < 0).long() * num_buckets
            n = n.abs()
        else:
            n = n.clamp(min=0)
        exact = num_buckets // 2
        large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                         * (num_buckets - exact)).long()
        return out + torch.where(n < exact, n, large.clamp(max=num_buckets - 1))

    for bidirectional in (True, False):
        emb = torch.randn(buckets, H, requires_grad=True)
        q, k, v = (torch.randn(2, H, L, 16) for _ in range(3))
        rel = torch.arange(L)[None] - torch.arange(L)[:, None]
        mask = emb[t5_bucket(rel, bidirectional)].permute(2, 0, 1)  # (H, L, L)
        ref = F.scaled_dot_product_attention(q, k, v, mask, scale=1.0)  # T5 does not scale
        table = fusedattn.t5_rel_bias(emb, max_distance, bidirectional)
        out = fusedattn.attention(q, k, v, rel_bias=table, scale=1.0)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        g = torch.autograd.grad(out.sum(), emb)[0]
        g_ref = torch.autograd.grad(ref.sum(), emb)[0]
        torch.testing.assert_close(g, g_ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("table,match", [
    (torch.randn(2, 5), "rel_bias must have shape (H, 2 D + 1) with H = 3"),
    (torch.randn(3, 4), "an odd number of entries"),
    (torch.randn(3), "rel_bias must have shape"),
    (torch.arange(15).view(3, 5), "rel_bias must be floating point"),
])
def test_bad_rel_bias_is_named(table, match):
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    with pytest.raises(RuntimeError, match=re.escape(match)):
        fusedattn.attention(q, k, v, rel_bias=table)


# ---------------------------------------------------------------- the module options
@pytest.mark.parametrize("batch_first", [False, True])
def test_module_window_and_alibi_equal_torch_with_the_mask(batch_first):
    torch.manual_seed(17)
    E, H, L = 24, 6, 13
    ours = fusedattn.MultiheadAttention(E, H, batch_first=batch_first, window=(4, 1), alibi=True).double()
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=batch_first).double()
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "alibi_slopes"})
    x = torch.randn((2, L, E) if batch_first else (L, 2, E), dtype=torch.float64)
    rel = torch.arange(L)[None] - torch.arange(L)[:, None]
    slopes = ours.alibi_slopes.double()
    bias = (-slopes[:, None, None] * rel.abs()).masked_fill((rel < -4) | (rel > 1), -math.inf)
    out, w = ours(x, x, x)
    ref, ref_w = theirs(x, x, x, attn_mask=bias.repeat(2, 1, 1))  # (N * H, L, L)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)


def test_module_alibi_slopes_are_the_papers():
    def paper(n):
        def geo(m):
            return [2 ** (-8 * (i + 1) / m) for i in range(m)]
        p = 2 ** int(math.log2(n))
        return geo(p) + geo(2 * p)[0::2][:n - p]
    for n in (1, 4, 6, 8, 12):
        m = fusedattn.MultiheadAttention(n * 2, n, alibi=True)
        torch.testing.assert_close(m.alibi_slopes, torch.tensor(paper(n)))
    given = torch.rand(4)
    assert torch.equal(fusedattn.MultiheadAttention(8, 4, alibi=given).alibi_slopes, given)


def test_module_rel_bias_and_softcap_learn_and_script():
    torch.manual_seed(18)
    m = fusedattn.MultiheadAttention(16, 4, batch_first=True, max_relative_distance=6, softcap=5.0,
                                     window=(8, 0))
    assert m.rel_bias.shape == (4, 13) and (m.rel_bias == 0).all()
    assert "rel_bias" in dict(m.named_parameters())
    x = torch.randn(3, 11, 16)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[2, 7:] = True
    out, _ = m(x, x, x, key_padding_mask=pad, need_weights=False)
    out.sum().backward()
    assert m.rel_bias.grad.abs().sum() > 0
    # The module's call is the op's on its projections.
    q, k, v = torch.nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, -1)
    heads = lambda t: t.view(3, 11, 4, 4).transpose(1, 2)
    o = fusedattn.attention(heads(q), heads(k), heads(v), key_padding_mask=pad, window=(8, 0),
                            softcap=5.0, rel_bias=m.rel_bias)
    ref = torch.nn.functional.linear(o.transpose(1, 2).reshape(3, 11, 16), m.out_proj.weight, m.out_proj.bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    scripted = torch.jit.script(m.eval())
    torch.testing.assert_close(scripted(x, x, x)[0], m(x, x, x)[0])
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x, x, x)[0], m(x, x, x)[0])
    # state_dict round trip keeps the table.
    m2 = fusedattn.MultiheadAttention(16, 4, batch_first=True, max_relative_distance=6, softcap=5.0,
                                      window=(8, 0))
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(x, x, x)[0], m(x, x, x)[0])


def test_module_sinks_learn_pack_script_and_refuse_a_cache():
    torch.manual_seed(19)
    m = fusedattn.MultiheadAttention(16, 4, batch_first=True, sinks=True)
    assert m.sinks.shape == (4,) and (m.sinks == 0).all() and "sinks" in dict(m.named_parameters())
    with torch.no_grad():
        m.sinks.copy_(torch.randn(4))
    x = torch.randn(3, 11, 16)
    out, w = m(x, x, x, is_causal=True, average_attn_weights=False)
    out.sum().backward()
    assert m.sinks.grad.abs().sum() > 0
    assert (w.sum(-1) < 1).all()  # each row's sink takes part of the weight
    q, k, v = torch.nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, -1)
    heads = lambda t: t.view(3, 11, 4, 4).transpose(1, 2)
    o, ref_w, _ = fusedattn.attention(heads(q), heads(k), heads(v), is_causal=True,
                                      sinks=m.sinks, return_weights=True)
    ref = torch.nn.functional.linear(o.transpose(1, 2).reshape(3, 11, 16), m.out_proj.weight,
                                     m.out_proj.bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
    # Averaged weights: each head scaled by its own sink before the mean.
    _, avg = m(x, x, x, is_causal=True)
    torch.testing.assert_close(avg, ref_w.mean(1), atol=1e-6, rtol=1e-5)
    # Packed sequences: each sequence as its own batch.
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    flat = x[0]
    packed, _ = m(flat, flat, flat, cu_seqlens=cu, need_weights=False, is_causal=True)
    for a, z in ((0, 4), (4, 11)):
        one, _ = m(flat[a:z][None], flat[a:z][None], flat[a:z][None], need_weights=False,
                   is_causal=True)
        torch.testing.assert_close(packed[a:z], one[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.jit.script(m.eval())(x, x, x)[0], m(x, x, x)[0])
    with pytest.raises(ValueError, match="does not take the variants .* or sinks"):
        m(x, x, x, cache=m.kv_cache(3, 16), is_causal=True, need_weights=False)


@pytest.mark.parametrize("kw,match", [
    (dict(window=(1,)), "window must be {left, right}"),
    (dict(softcap=-1.0), "softcap must be positive"),
    (dict(max_relative_distance=-2), "max_relative_distance must be >= 0"),
    (dict(max_relative_distance=2.5), "max_relative_distance must be an int"),
])
def test_module_bad_variant_options(kw, match):
    with pytest.raises((RuntimeError, TypeError), match=re.escape(match)):
        fusedattn.MultiheadAttention(8, 2, **kw)


# Keys as the GEMMs' rows (>= 128 queries per key/value head): the fp32 backward (AVX-512
# tiers), the bf16 forward and backward (packed GEMMs: AMX, or from avx512_bf16 up the portable
# implementation of their layout that FUSEDATTN_PACKED_GEMM=reference offers). The variants in
# their own vector passes, lanes cut by the window, rel_bias's gradient summed per lane; the
# forward's first key range starting inside a 512-key block (L=200, S=1100, bottom-right).
# Against the formula and against the query-rows path (unpacked).
KR_CASES = [dict(window=(20, 5)), dict(window=(0, -1), is_causal=True), dict(window=(-1, 3)),
            dict(alibi=True), dict(softcap=2.0), dict(rel_bias=4), dict(rel_bias=40), dict(rel_bias=300),
            dict(rel_bias=7, alibi=True, softcap=5.0, window=(40, 40), is_causal=True)]


@pytest.mark.parametrize("kw", KR_CASES, ids=lambda kw: "-".join(kw))
@pytest.mark.parametrize("L,S,bottom_right", [(150, 170, False), (170, 150, True), (300, 77, False),
                                              (200, 1100, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_as_rows_with_variants(kw, L, S, bottom_right, dtype, monkeypatch):
    torch.manual_seed(21)
    kw = dict(kw)
    H, Hk = 4, 2
    q = rand(2, H, L, 16).to(dtype).detach().requires_grad_()
    k, v = (rand(2, Hk, S, n).to(dtype).detach().requires_grad_() for n in (16, 24))
    alibi = torch.rand(2, H) if kw.pop("alibi", False) else None
    table = None
    if "rel_bias" in kw:
        table = torch.randn(H, 2 * kw.pop("rel_bias") + 1, requires_grad=True)
    align = "bottom_right" if bottom_right else "top_left"
    g = torch.randn(2, H, L, 24).to(dtype)
    monkeypatch.setenv("FUSEDATTN_PACKED_GEMM", "reference")  # where the CPU has no AMX

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        t = None if table is None else table.detach().clone().requires_grad_()
        out = fusedattn.attention(*leaves, enable_gqa=True, causal_alignment=align, alibi_slopes=alibi,
                                  rel_bias=t, **kw)
        out.backward(g)
        return [out] + [x.grad for x in leaves] + ([] if t is None else [t.grad])
    fused = grads()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if table is not None:
        t64 = table.detach().double().requires_grad_()
        ref, _ = formula_rel(*leaves, t64, bottom_right=bottom_right, alibi=alibi, gqa=True, **kw)
    else:
        ref, _ = formula(*leaves, bottom_right=bottom_right, alibi=alibi, gqa=True, **kw)
    ref.backward(g.double())
    want = [ref] + [x.grad for x in leaves] + ([] if table is None else [t64.grad])
    monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "unpacked")  # the query-rows backward
    rows = grads()
    # Within twice the query-rows path's own error (fp32: sums over 300 queries round; bf16:
    # P and dS rounded to 8 bits for the products, and D from O rounded to bf16, on keys as
    # rows; the query rows keep P and dS in fp32 and, where a key block holds the whole row,
    # take D = rowsum(P * dP): rel_bias's gradient, a sum of dS over the table entry's
    # scores, then differs by up to 1.6% of its largest value at S = 77).
    floor = 1e-5 if dtype == torch.float32 else 2e-2
    for name, got, other, w in zip(["out", "dq", "dk", "dv", "d_rel"], fused, rows, want):
        err = (got.double() - w).abs().max().item()
        other_err = (other.double() - w).abs().max().item()
        assert err <= 2 * other_err + floor * max(1.0, w.abs().max().item()), (name, err, other_err)

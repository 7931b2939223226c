import math

import pytest
import torch
import torch.nn.functional as F

import fusedattn
from conftest import reference_attention

SIZES = [(1, 1), (1, 7), (7, 1), (7, 33), (33, 7), (33, 33)]


def rand(*shape, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("heads", [(1, 1), (4, 4), (4, 2)])
def test_matches_sdpa_and_reference(L, S, heads):
    H, Hk = heads
    q, k, v = rand(2, H, L, 5), rand(2, Hk, S, 5), rand(2, Hk, S, 3)
    gqa = H != Hk
    out = fusedattn.attention(q, k, v, enable_gqa=gqa)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
    torch.testing.assert_close(out, reference_attention(q, k, v)[0])


@pytest.mark.parametrize("mask_kind", ["bool", "float", "bool_bcast", "float_heads"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(7, 33), (33, 7), (1, 7), (5, 5)])
def test_masks_against_reference(mask_kind, causal, L, S):
    N, H = 2, 3
    q, k, v = rand(N, H, L, 8), rand(N, H, S, 8), rand(N, H, S, 8)
    mask = {"bool": torch.rand(N, H, L, S) > 0.3, "float": rand(L, S),
            "bool_bcast": torch.rand(S) > 0.2, "float_heads": rand(H, 1, S)}[mask_kind]
    kpm = torch.rand(N, S) > 0.7
    out, w, lse = fusedattn.attention(q, k, v, mask, is_causal=causal is not None,
                                      causal_alignment=causal or "top_left",
                                      key_padding_mask=kpm, return_weights=True, return_lse=True)
    ref_out, ref_w = reference_attention(q, k, v, mask, kpm, causal is not None,
                                         causal == "bottom_right")
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    assert not out.isnan().any() and not w.isnan().any()
    assert lse.shape == (N, H, L) and lse.dtype == torch.float64


def test_top_left_causal_matches_sdpa_and_bottom_right_matches_torch_bias():
    from torch.nn.attention.bias import causal_lower_right
    q, k, v = rand(2, 2, 5, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    torch.testing.assert_close(fusedattn.attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(
        fusedattn.attention(q, k, v, is_causal=True, causal_alignment="bottom_right"),
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 9)))


def test_float_key_padding_mask_and_scale():
    q, k, v = rand(2, 2, 6, 4), rand(2, 2, 9, 4), rand(2, 2, 9, 4)
    kpm = rand(2, 9)
    torch.testing.assert_close(fusedattn.attention(q, k, v, scale=0.7, key_padding_mask=kpm),
                               reference_attention(q, k, v, key_padding_mask=kpm, scale=0.7)[0])


def test_more_batch_dims_and_3d_inputs():
    q, k, v = rand(2, 3, 2, 5, 4), rand(2, 3, 2, 6, 4), rand(2, 3, 2, 6, 4)
    torch.testing.assert_close(fusedattn.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(fusedattn.attention(q[0, 0], k[0, 0], v[0, 0]),
                               F.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]))


def test_non_contiguous_inputs():
    base = rand(2, 7, 3, 8)  # (N, L, H, E) viewed as (N, H, L, E)
    q = k = v = base.transpose(1, 2)
    assert not q.is_contiguous()
    torch.testing.assert_close(fusedattn.attention(q, k, v), reference_attention(q, k, v)[0])


def test_fully_masked_rows_give_zero_not_nan():
    q = rand(1, 2, 4, 8, requires_grad=True)
    k, v = rand(1, 2, 6, 8, requires_grad=True), rand(1, 2, 6, 8, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    out, w, lse = fusedattn.attention(q, k, v, mask, return_weights=True, return_lse=True)
    assert (out[:, :, 2] == 0).all() and (w[:, :, 2] == 0).all()
    assert torch.isneginf(lse[:, :, 2]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert not t.grad.isnan().any()
    assert (q.grad[:, :, 2] == 0).all()
    kpm = torch.ones(1, 6, dtype=torch.bool)  # every key is padding
    assert (fusedattn.attention(q, k, v, key_padding_mask=kpm) == 0).all()


def test_zero_length_sequences():
    out = fusedattn.attention(rand(1, 2, 0, 4), rand(1, 2, 5, 4), rand(1, 2, 5, 3))
    assert out.shape == (1, 2, 0, 3)
    out = fusedattn.attention(rand(1, 2, 3, 4), rand(1, 2, 0, 4), rand(1, 2, 0, 3))
    assert out.shape == (1, 2, 3, 3) and (out == 0).all()


def test_return_values():
    q, k, v = rand(1, 2, 3, 4), rand(1, 2, 5, 4), rand(1, 2, 5, 4)
    assert isinstance(fusedattn.attention(q, k, v), torch.Tensor)
    out, w, lse = fusedattn.attention(q, k, v, return_weights=True)
    assert w.shape == (1, 2, 3, 5) and lse is None
    out, w, lse = fusedattn.attention(q, k, v, return_lse=True)
    assert w is None and lse.shape == (1, 2, 3)
    s = q @ k.transpose(-2, -1) / 2
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_torchs(dtype):
    q, k, v = rand(2, 4, 37, 40), rand(2, 4, 29, 40), rand(2, 4, 29, 40)
    mask = torch.rand(37, 29) > 0.2
    ref = reference_attention(q, k, v, mask)[0]
    ours = fusedattn.attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    theirs = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    assert ours.dtype == dtype
    err = (ours.double() - ref).abs().max().item()
    torch_err = (theirs.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def test_gradients_against_reference_all_features():
    q = rand(2, 4, 7, 6, requires_grad=True)
    k, v = rand(2, 2, 11, 6, requires_grad=True), rand(2, 2, 11, 5, requires_grad=True)
    mask = rand(4, 1, 11, requires_grad=True)
    kpm = rand(2, 11, requires_grad=True)
    out, w, lse = fusedattn.attention(q, k, v, mask, is_causal=True, enable_gqa=True,
                                      key_padding_mask=kpm, causal_alignment="bottom_right",
                                      return_weights=True, return_lse=True)
    ref_out, ref_w = reference_attention(q, k, v, mask, kpm, True, True)
    go, gw = torch.randn_like(out), torch.randn_like(w)
    gl = torch.randn_like(lse)
    ours = torch.autograd.grad((out, w), (q, k, v, mask, kpm), (go, gw), retain_graph=True)
    theirs = torch.autograd.grad((ref_out, ref_w), (q, k, v, mask, kpm), (go, gw))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    # lse's gradient: d lse / d s = softmax(s)
    (g_lse,) = torch.autograd.grad(lse, q, gl)
    s = (q @ k.repeat_interleave(2, 1).transpose(-2, -1)) / math.sqrt(6) + mask + kpm[:, None, None]
    causal = torch.arange(11)[None] <= torch.arange(7)[:, None] + 4
    s = s.masked_fill(~causal, -math.inf)
    (g_ref,) = torch.autograd.grad(torch.logsumexp(s, -1), q, gl)
    torch.testing.assert_close(g_lse, g_ref)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q = rand(1, 2, 3, 4, requires_grad=True)
    k, v = rand(1, 1, 5, 4, requires_grad=True), rand(1, 1, 5, 3, requires_grad=True)
    mask = rand(3, 5, requires_grad=True)
    kpm = torch.tensor([[False, True, False, False, False]])

    def f(q, k, v, mask):
        out, w, lse = fusedattn.attention(q, k, v, mask, is_causal=causal, enable_gqa=True,
                                          key_padding_mask=kpm, return_weights=True,
                                          return_lse=True)
        return out, w, lse

    assert torch.autograd.gradcheck(f, (q, k, v, mask))


def test_gradcheck_with_dropout_through_the_seeded_op():
    q = rand(1, 2, 4, 4, requires_grad=True)
    k, v = rand(1, 2, 5, 4, requires_grad=True), rand(1, 2, 5, 3, requires_grad=True)
    seed = torch.tensor([1234])

    def f(q, k, v):
        out, lse, _ = torch.ops.fusedattn._attention_forward(
            q, k, v, None, None, seed, 0.4, False, False, None, False, False)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dropout_repeats_under_manual_seed_and_is_unbiased():
    q, k, v = rand(2, 2, 16, 8), rand(2, 2, 16, 8), rand(2, 2, 16, 8)
    torch.manual_seed(5)
    a = fusedattn.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    b = fusedattn.attention(q, k, v, dropout_p=0.3)
    c = fusedattn.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Fraction of dropped probabilities and unbiasedness: V = identity rows expose P * mask.
    S = 64
    q, k = rand(4, 4, 64, 8), rand(4, 4, S, 8)
    v = torch.eye(S, dtype=torch.float64).expand(4, 4, S, S)
    w = fusedattn.attention(q, k, v, return_weights=True)[1]
    out = torch.stack([fusedattn.attention(q, k, v, dropout_p=0.25) for _ in range(8)])
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - 0.25) < 0.01, dropped
    torch.testing.assert_close(out.mean(0).mean(), w.mean(), rtol=0.02, atol=0)
    kept = out[0] != 0
    torch.testing.assert_close(out[0][kept], (w / 0.75)[kept])


def test_dropout_backward_uses_the_forward_mask():
    q = rand(1, 1, 6, 4, requires_grad=True)
    k, v = rand(1, 1, 6, 4), rand(1, 1, 6, 4, requires_grad=True)
    out = fusedattn.attention(q, k, v, dropout_p=0.5)
    (gv,) = torch.autograd.grad(out.sum(), v)
    # out = (P * M) V, so dL/dV = (P * M)^T 1: recover P * M from out with V = I.
    torch.manual_seed(0)
    out = fusedattn.attention(q, k, v, dropout_p=0.5)
    (gv1,) = torch.autograd.grad(out.sum(), v)
    torch.manual_seed(0)
    pm = fusedattn.attention(q, k, torch.eye(6, dtype=torch.float64)[None, None], dropout_p=0.5)
    torch.testing.assert_close(gv1, pm.transpose(-2, -1) @ torch.ones(1, 1, 6, 4, dtype=torch.float64))


def opcheck_samples():
    yield (rand(2, 3, 5, 8), rand(2, 3, 7, 8), rand(2, 3, 7, 4)), {}
    yield (rand(2, 4, 5, 8, requires_grad=True), rand(2, 2, 7, 8, requires_grad=True),
           rand(2, 2, 7, 8, requires_grad=True), torch.rand(5, 7) > 0.3), dict(
        enable_gqa=True, is_causal=True, causal_alignment="bottom_right",
        key_padding_mask=torch.rand(2, 7) > 0.8, return_weights=True)
    yield (rand(1, 2, 3, 4, dtype=torch.float32, requires_grad=True),
           rand(1, 2, 6, 4, dtype=torch.float32), rand(1, 2, 6, 4, dtype=torch.float32),
           rand(3, 6, dtype=torch.float32, requires_grad=True)), dict(scale=0.5, return_lse=True)
    yield (rand(2, 4, 5, 8, requires_grad=True), rand(2, 2, 7, 8, requires_grad=True),
           rand(2, 2, 7, 8, requires_grad=True)), dict(
        enable_gqa=True, is_causal=True, key_padding_mask=torch.rand(2, 7) > 0.8,
        return_weights=True, average_weights=True)


@pytest.mark.parametrize("i", range(4))
def test_opcheck(i):
    args, kwargs = list(opcheck_samples())[i]
    torch.library.opcheck(torch.ops.fusedattn.attention.default, args, kwargs)


def test_opcheck_internal_forward_with_dropout_seed():
    args = (rand(2, 2, 5, 8, requires_grad=True), rand(2, 2, 7, 8, requires_grad=True),
            rand(2, 2, 7, 8, requires_grad=True), None, torch.rand(2, 7) > 0.5,
            torch.tensor([42]), 0.2, True, False, None, False, True)
    torch.library.opcheck(torch.ops.fusedattn._attention_forward.default, args)


def test_torch_compile_fullgraph_dynamic():
    def f(q, k, v, kpm):
        out, w, _ = fusedattn.attention(q, k, v, key_padding_mask=kpm, is_causal=True,
                                        return_weights=True)
        return out * 2 + w.sum(-1, keepdim=True)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for L in (5, 9):
        q = rand(2, 2, L, 8, requires_grad=True)
        k, v = rand(2, 2, L, 8), rand(2, 2, L, 8)
        kpm = torch.rand(2, L) > 0.8
        got, want = compiled(q, k, v, kpm), f(q, k, v, kpm)
        torch.testing.assert_close(got, want)
        g1, = torch.autograd.grad(got.sum(), q)
        g2, = torch.autograd.grad(want.sum(), q)
        torch.testing.assert_close(g1, g2)


def test_torch_compile_dropout_draws_a_new_mask_each_call():
    f = torch.compile(lambda q, k, v: fusedattn.attention(q, k, v, dropout_p=0.5), fullgraph=True)
    q, k, v = rand(1, 1, 8, 4), rand(1, 1, 8, 4), rand(1, 1, 8, 4)
    assert not torch.equal(f(q, k, v), f(q, k, v))


@pytest.mark.parametrize("call,message", [
    (lambda q, k, v: fusedattn.attention(q, k, v[..., :5, :]), "value must have shape"),
    (lambda q, k, v: fusedattn.attention(q, k.float(), v), "same dtype"),
    (lambda q, k, v: fusedattn.attention(q, k[:, :1], v[:, :1]), "enable_gqa"),
    (lambda q, k, v: fusedattn.attention(q[:, :3], k[:, :2], v[:, :2], enable_gqa=True),
     "must be a multiple"),
    (lambda q, k, v: fusedattn.attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
     r"key_padding_mask must have shape \(..., S\) = \[2, 6\], got \[2, 5\]"),
    (lambda q, k, v: fusedattn.attention(q, k, v, torch.ones(4, 4, dtype=torch.bool)),
     "attn_mask must broadcast"),
    (lambda q, k, v: fusedattn.attention(q, k, v, torch.ones(5, 6, dtype=torch.int32)),
     "attn_mask must be bool or have query's dtype"),
    (lambda q, k, v: fusedattn.attention(q, k, v, causal_alignment="diagonal"), "causal_alignment"),
    (lambda q, k, v: fusedattn.attention(q, k, v, dropout_p=-0.1), "dropout_p"),
    (lambda q, k, v: fusedattn.attention(q[0, 0], k[0, 0], v[0, 0]), "at least 3 dims"),
    (lambda q, k, v: fusedattn.attention(q.int(), k.int(), v.int()), "query must be float64"),
    (lambda q, k, v: fusedattn.attention(q, k, v, key_padding_mask=torch.ones(2, 6)),
     "key_padding_mask must be bool or have query's dtype"),
])
def test_errors_name_the_argument(call, message):
    q, k, v = rand(2, 4, 5, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 8)
    with pytest.raises(RuntimeError, match=message):
        call(q, k, v)


def test_gradcheck_float_key_padding_mask_without_attn_mask():
    q, k, v = (rand(2, 2, 3, 4, requires_grad=True), rand(2, 2, 5, 4, requires_grad=True),
               rand(2, 2, 5, 4, requires_grad=True))
    kpm = rand(2, 5, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, kpm: fusedattn.attention(q, k, v, key_padding_mask=kpm), (q, k, v, kpm))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,S", [(5, 7), (130, 600)])  # 130: the fused kernels' head loop
@pytest.mark.parametrize("causal", [False, True])
def test_average_weights_is_the_mean_over_heads(dtype, L, S, causal):
    # average_weights returns mean_h(weights_h) (..., L, S), the output unchanged; GQA, key
    # padding (a fully padded batch: zeros), dropout (the weights stay the probabilities
    # before dropout, the output uses the dropped ones).
    gen = torch.Generator().manual_seed(L + S)
    q = torch.randn(3, 4, L, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(3, 2, S, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    pad = torch.rand(3, S, generator=gen) > 0.7
    pad[2] = True
    kw = dict(enable_gqa=True, is_causal=causal, key_padding_mask=pad, dropout_p=0.2,
              return_weights=True)
    torch.manual_seed(1)
    exact_out, exact_w, _ = fusedattn.attention(q, k, v, **kw)
    args = [t.to(dtype) for t in (q, k, v)]
    torch.manual_seed(1)
    out, w, _ = fusedattn.attention(*args, **kw, average_weights=True)
    torch.manual_seed(1)
    out_h, w_h, _ = fusedattn.attention(*args, **kw)
    assert w.shape == (3, L, S) and w.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(w.double(), exact_w.mean(1), atol=tol, rtol=0)
    torch.testing.assert_close(w.double(), w_h.double().mean(1), atol=tol, rtol=0)
    assert (w[2] == 0).all()
    torch.testing.assert_close(out.double(), out_h.double(), atol=tol, rtol=0)  # order of ops


def test_average_weights_gradients():
    # dL/dw_h = dL/dw_avg / H: gradcheck through the averaged weights (and the output).
    q = rand(2, 3, 4, 5, requires_grad=True)
    k, v = rand(2, 3, 6, 5, requires_grad=True), rand(2, 3, 6, 3, requires_grad=True)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])

    def f(q, k, v):
        out, w, _ = fusedattn.attention(q, k, v, key_padding_mask=pad, is_causal=True,
                                        causal_alignment="bottom_right", return_weights=True,
                                        average_weights=True)
        return out, w
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_average_weights_needs_return_weights():
    q = rand(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="average_weights=True .* needs return_weights=True"):
        fusedattn.attention(q, q, q, average_weights=True)


# Gradients at peaked softmax rows, tiny head dims and GQA: fusedattn's error against an fp64
# reference at most twice SDPA's own in the same dtype. Peaked rows (inputs randn * 4) once
# lost accuracy two ways: D = rowsum(dO * O) read O rounded to fp16/bf16 (a cancellation in
# dP - D), and P = exp(s - lse) carried lse's fp32 rounding. Rows whose keys fit one backward
# block (256) take their own softmax and D = rowsum(P * dP) (both backward layouts); longer
# rows read O in fp32, which the forward keeps where a gradient is wanted (fp32_out).
PEAKED_CASES = [
    # dtype, B, H, Hk, L, S, E, Ev, attn_mask, key_padding_mask, causal, alignment, scale
    (torch.float16, 2, 2, 1, 1, 70, 44, 130, None, "float", False, "top_left", 0.845),
    (torch.float16, 2, 2, 2, 11, 63, 2, 128, "bool", None, False, "top_left", None),
    (torch.bfloat16, 2, 2, 2, 21, 65, 127, 15, "float", "float", False, "top_left", 1.25),
    (torch.float16, 2, 2, 1, 3, 700, 44, 130, None, "float", False, "top_left", 0.845),
    (torch.bfloat16, 2, 2, 1, 21, 650, 127, 15, "float", "float", True, "bottom_right", 1.25),
    (torch.float32, 2, 4, 2, 65, 2, 1, 52, "float", None, True, "top_left", None),
    (torch.float32, 2, 4, 2, 64, 63, 57, 57, "bool", "bool", True, "bottom_right", None),
    (torch.float32, 1, 3, 1, 40, 200, 3, 9, None, "bool", True, "bottom_right", 2.0),
    # no attn_mask and 128+ queries per kv head: fp32's keys-as-rows backward (avx512 up)
    (torch.float32, 2, 4, 2, 65, 2, 1, 52, None, None, True, "top_left", None),
    (torch.float32, 2, 4, 2, 65, 2, 1, 52, None, None, True, "bottom_right", None),
    (torch.float32, 1, 8, 2, 100, 200, 3, 9, None, "bool", True, "bottom_right", 2.0),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", PEAKED_CASES, ids=lambda c: f"{str(c[0])[6:]}-L{c[4]}-S{c[5]}-E{c[6]}")
def test_peaked_gradients_within_twice_sdpas_error(case, seed):
    dtype, B, H, Hk, L, S, E, Ev, mask_kind, kpm_kind, causal, align, scale = case
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, L, E, generator=g) * 4, torch.randn(B, Hk, S, E, generator=g) * 4
    v, do = torch.randn(B, Hk, S, Ev, generator=g) * 4, torch.randn(B, H, L, Ev, generator=g)
    am = kpm = None
    if mask_kind == "float":
        am = torch.randn(B, H, L, S, generator=g)
    elif mask_kind == "bool":
        am = torch.rand(B, H, L, S, generator=g) > 0.3
    if kpm_kind == "float":
        kpm = torch.randn(B, S, generator=g)
    elif kpm_kind == "bool":
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[:, -(S // 3):] = True

    def additive(dt):  # every mask as one (B, H, L, S) additive mask, for SDPA
        m = torch.zeros(B, H, L, S, dtype=dt)
        if am is not None:
            m = m + (am.to(dt) if am.dtype != torch.bool
                     else torch.zeros_like(m).masked_fill(~am, float("-inf")))
        if kpm is not None:
            m = m + (kpm.to(dt) if kpm.dtype != torch.bool else torch.zeros(B, S, dtype=dt)
                     .masked_fill(kpm, float("-inf")))[:, None, None, :]
        if causal:
            visible = torch.ones(L, S, dtype=torch.bool).tril(S - L if align == "bottom_right" else 0)
            m = m.masked_fill(~visible, float("-inf"))
        return m

    def grads(f, dt):
        qq, kk, vv = (t.to(dt).clone().requires_grad_() for t in (q, k, v))
        f(qq, kk, vv).backward(do.to(dt))
        return [t.grad.double() for t in (qq, kk, vv)]

    def sdpa(dt):
        return lambda a, b, c: F.scaled_dot_product_attention(
            a, b, c, attn_mask=additive(dt), scale=scale, enable_gqa=H != Hk)

    def ours(a, b, c):
        cast = lambda m: None if m is None else (m if m.dtype == torch.bool else m.to(dtype))  # noqa: E731
        return fusedattn.attention(a, b, c, attn_mask=cast(am), key_padding_mask=cast(kpm),
                                   is_causal=causal, causal_alignment=align, scale=scale,
                                   enable_gqa=H != Hk)

    ref = grads(sdpa(torch.float64), torch.float64)
    theirs, got = grads(sdpa(dtype), dtype), grads(ours, dtype)
    for name, r, t, o in zip(("dq", "dk", "dv"), ref, theirs, got):
        size = r.abs().max().item() or 1.0
        err_t, err_o = (t - r).abs().max().item() / size, (o - r).abs().max().item() / size
        assert err_o <= 2 * err_t + 1e-6, f"{name}: {err_o:.3g} against SDPA's {err_t:.3g}"


# fp32_out (the forwards' flag, which the autograd sets for half-precision inputs that want a
# gradient): out in fp32 that rounds to the default out's bits, on every forward path: query
# rows, the weights' paths, the modules' projected form and packed sequences (and bf16's
# keys-as-rows forward where the portable packed GEMM runs it).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["rows", "weights", "averaged", "projected", "varlen"])
def test_fp32_out_rounds_to_the_default_out(dtype, path):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    ops = torch.ops.fusedattn
    if path == "projected":  # packed q|k|v (L, N, 3 H D), 2 heads of 24
        x, pad = r(130, 2, 144), torch.rand(2, 130, generator=g) > 0.8
        call = lambda f32: ops._attention_projected_forward(  # noqa: E731
            x, None, None, 2, True, None, pad, None, 0.0, True, False, False, f32)
    elif path == "varlen":
        cu = torch.tensor([0, 130, 131, 200], dtype=torch.int32)
        q, k, v = r(200, 4, 24), r(200, 2, 24), r(200, 2, 40)
        call = lambda f32: ops._attention_varlen_forward(  # noqa: E731
            q, k, v, cu, cu, 130, 130, None, 0.0, True, False, None, True, None, None, None,
            None, f32)
    else:
        q, k, v = r(2, 4, 130, 24), r(2, 2, 77, 24), r(2, 2, 77, 40)
        pad = torch.rand(2, 77, generator=g) > 0.8
        weights, averaged = path != "rows", path == "averaged"
        call = lambda f32: ops._attention_forward(  # noqa: E731
            q, k, v, None, pad, None, 0.0, True, True, None, True, weights, averaged, None,
            None, None, None, f32)
    torch.manual_seed(0)
    out = call(False)[0]
    torch.manual_seed(0)
    wide = call(True)[0]
    assert out.dtype == dtype and wide.dtype == torch.float32 and wide.shape == out.shape
    assert torch.equal(wide.to(dtype), out)
    assert (wide != wide.to(dtype).float()).any()  # digits past the dtype's: kept


def test_fp32_out_opcheck_and_autograd_dtype():
    q = rand(2, 4, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    k = rand(2, 2, 7, 8, dtype=torch.bfloat16, requires_grad=True)
    v = rand(2, 2, 7, 8, dtype=torch.bfloat16, requires_grad=True)
    args = (q, k, v, None, torch.rand(2, 7) > 0.5, None, 0.0, True, False, None, True, False,
            False, None, None, None, None, True)
    torch.library.opcheck(torch.ops.fusedattn._attention_forward.default, args)
    # The caller gets the inputs' dtype whether or not the forward kept fp32 for the backward.
    out = fusedattn.attention(q, k, v, enable_gqa=True)
    assert out.dtype == torch.bfloat16 and out.requires_grad
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()
    with torch.no_grad():
        assert fusedattn.attention(q, k, v, enable_gqa=True).dtype == torch.bfloat16


def test_backward_names_out_and_grad_out_dtypes():
    q = rand(1, 2, 9, 8, dtype=torch.bfloat16)
    out, lse, _ = torch.ops.fusedattn._attention_forward(
        q, q, q, None, None, None, 0.0, False, False, None, False, False, False, None, None,
        None, None, True)
    back = lambda g, o: torch.ops.fusedattn._attention_backward(  # noqa: E731
        g, None, None, q, q, q, o, lse, None, None, None, 0.0, False, False, None, False, False,
        False)
    assert back(torch.ones_like(q), out)[0].dtype == torch.bfloat16  # fp32 out: accepted
    with pytest.raises(RuntimeError, match="grad_out must be BFloat16"):
        back(torch.ones_like(out), out)
    with pytest.raises(RuntimeError, match=r"out must be BFloat16 \(or float32"):
        back(torch.ones_like(q), out.double())


# torch's fp32 matmul precision: at bf16 ("medium", or torch.backends.mkldnn.matmul.fp32_precision
# = "bf16") fp32 inputs take bf16 products where torch's own do (oneDNN on AMX); the portable
# packed GEMM (FUSEDATTN_PACKED_GEMM=reference) runs that path on any avx512_bf16 CPU.
def _bf16_model(q, k, v, do, additive, scale, group):
    """fp32 attention with every product's operands rounded to bf16 (SDPA's CPU kernel under
    bf16 matmul precision on AMX), the softmax, D and the sums in fp32: (out, dq, dk, dv)."""
    r = lambda x: x.bfloat16().float()  # noqa: E731
    k, v = (t.repeat_interleave(group, dim=-3) for t in (k, v))
    s = r(q) @ r(k).transpose(-1, -2) * scale + additive
    p = s.softmax(-1).nan_to_num()
    out = r(p) @ r(v)
    dv = r(p).transpose(-1, -2) @ r(do)
    ds = p * (r(do) @ r(v).transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
    dq = r(ds) @ r(k) * scale
    dk = r(ds).transpose(-1, -2) @ r(q) * scale
    fold = lambda g: g.unflatten(-3, (-1, group)).sum(-3)  # noqa: E731
    return out, dq, fold(dk), fold(dv)


@pytest.fixture
def restore_matmul_precision():
    yield
    torch.set_float32_matmul_precision("highest")


@pytest.mark.own_kernels
@pytest.mark.parametrize("setting", ["medium", "mkldnn_bf16", "high"])
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("case", [
    # B, H, Hk, L, S, E, causal alignment (None: not causal), key padding
    (2, 3, 3, 130, 77, 64, None, True),
    (1, 4, 2, 200, 530, 32, "bottom_right", False),
    (2, 2, 1, 129, 65, 33, "top_left", True),  # odd E: the forward keeps fp32 products
])
def test_fp32_matmul_precision_setting(case, portable, setting, monkeypatch, restore_matmul_precision):
    B, H, Hk, L, S, E, align, padded = case
    if portable:
        monkeypatch.setenv("FUSEDATTN_PACKED_GEMM", "reference")
    else:  # oneDNN's packed GEMM even where the suite runs on the portable one
        monkeypatch.delenv("FUSEDATTN_PACKED_GEMM", raising=False)
    g = torch.Generator().manual_seed(L * S + E)
    q = torch.randn(B, H, L, E, generator=g)
    k, v = (torch.randn(B, Hk, S, E, generator=g) for _ in range(2))
    do = torch.randn(B, H, L, E, generator=g)
    kpm = torch.rand(B, S, generator=g) < 0.2 if padded else None
    additive = torch.zeros(B, 1, L, S)
    if kpm is not None:
        additive = additive.masked_fill(kpm[:, None, None, :], float("-inf"))
    if align is not None:
        visible = torch.ones(L, S, dtype=torch.bool).tril(S - L if align == "bottom_right" else 0)
        additive = additive.masked_fill(~visible, float("-inf"))

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = fusedattn.attention(qq, kk, vv, key_padding_mask=kpm, is_causal=align is not None,
                                  causal_alignment=align or "top_left", enable_gqa=H != Hk)
        out.backward(do)
        return [out.detach(), qq.grad, kk.grad, vv.grad]

    exact = run()
    if setting == "mkldnn_bf16":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    else:
        torch.set_float32_matmul_precision(setting)
    got = run()
    assert all(t.dtype == torch.float32 for t in got)
    cap = fusedattn.cpu_capability()
    rounded = setting != "high" and (cap == "amx" or (portable and cap == "avx512_bf16"))
    if not rounded:  # "high" (tf32: nothing on the CPU), or a CPU where torch keeps fp32 too
        for e, t in zip(exact, got):
            assert torch.equal(e, t)
        return
    model = _bf16_model(q, k, v, do, additive, E ** -0.5, H // Hk)
    fp64 = [t.double() for t in run_fp64(q, k, v, do, kpm, align, H != Hk)]
    for name, m, t, e in zip(("out", "dq", "dk", "dv"), model, got, fp64):
        size = e.abs().max().item()
        err_t, err_m = (t.double() - e).abs().max().item(), (m.double() - e).abs().max().item()
        assert err_t <= 2 * err_m + 1e-6 * size, f"{name}: {err_t:.3g} against the bf16 model's {err_m:.3g}"
    # Honoured: the products were bf16's (fp32's error is ~1e-6 of the values).
    size = fp64[0].abs().max().item()
    err_out = (got[0].double() - fp64[0]).abs().max().item()
    assert (err_out > 1e-4 * size) == (E % 2 == 0), err_out


def run_fp64(q, k, v, do, kpm, align, gqa):
    """The formula in fp64 (conftest's reference) and its autograd gradients."""
    qq, kk, vv = (t.double().requires_grad_() for t in (q, k, v))
    out, _ = reference_attention(qq, kk, vv, key_padding_mask=kpm, is_causal=align is not None,
                                 bottom_right=align == "bottom_right")
    out.backward(do.double())
    return [out.detach(), qq.grad, kk.grad, vv.grad]

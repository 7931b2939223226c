"""The fused CPU kernels against the fp64 formula and against the ATen reference path, on
sizes that cross their blocks (64 queries x 512 keys forward, 64 x 256 backward)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import fusedattn
from conftest import reference_attention

# (L, S): single partial block, exact block edges, several blocks with ragged ends.
SIZES = [(1, 1), (65, 513), (130, 600), (600, 130), (257, 1031)]


def rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


def masks(kind, N, H, L, S, dtype):
    if kind == "none":
        return None, None
    if kind == "bool":
        m = torch.rand(N, 1, L, S) > 0.2
        m[..., 0] = True
        return m, None
    if kind == "float":
        return rand(H, L, S, dtype=dtype), None
    if kind == "kpm_bool":
        kpm = torch.rand(N, S) > 0.7
        kpm[:, 0] = False
        return None, kpm
    if kind == "kpm_float":
        return None, rand(N, S, dtype=dtype)
    raise ValueError(kind)


@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("kind", ["none", "bool", "float", "kpm_bool", "kpm_float"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_forward_and_backward_fp32_against_fp64(L, S, kind, causal):
    N, H, Hk, E = 2, 4, 2, 24
    q = rand(N, H, L, E, requires_grad=True)
    k, v = rand(N, Hk, S, E, requires_grad=True), rand(N, Hk, S, 20, requires_grad=True)
    mask, kpm = masks(kind, N, H, L, S, torch.float32)
    kw = dict(is_causal=causal is not None, causal_alignment=causal or "top_left",
              enable_gqa=True, key_padding_mask=kpm)
    # Two kernels: the flash forward, and (weights asked) the one that forms whole score rows.
    out_w, w, lse_w = fusedattn.attention(q, k, v, mask, return_weights=True, return_lse=True, **kw)
    out, _, lse = fusedattn.attention(q, k, v, mask, return_lse=True, **kw)
    ref, ref_w = reference_attention(q, k, v, mask, kpm, causal is not None, causal == "bottom_right")
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out_w.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(w.double(), ref_w, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(lse_w, lse, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_types_error_at_most_twice_torchs(dtype, causal):
    N, H, L, S, E = 2, 3, 130, 600, 40
    q, k, v = (rand(N, H, n, E, dtype=torch.float64, requires_grad=True) for n in (L, S, S))
    kpm = torch.rand(N, S) > 0.8
    ref, _ = reference_attention(q, k, v, key_padding_mask=kpm, is_causal=causal, bottom_right=True)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    lo = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ours = fusedattn.attention(*lo, key_padding_mask=kpm, is_causal=causal,
                               causal_alignment="bottom_right")
    our_grads = torch.autograd.grad(ours, lo, g.to(dtype))
    # torch in the same dtype, with the same masks as one boolean mask (bottom-right causal).
    allowed = ~kpm[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(S)[None] <= torch.arange(L)[:, None] + S - L)
    theirs = torch.nn.functional.scaled_dot_product_attention(*lo, attn_mask=allowed)
    their_grads = torch.autograd.grad(theirs, lo, g.to(dtype))
    for a, b, r in [(ours, theirs, ref)] + list(zip(our_grads, their_grads, ref_grads)):
        err = (a.double() - r).abs().max().item()
        torch_err = (b.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-4, (err, torch_err)


def _one_float_mask(N, H, L, S, mask, kpm, causal):
    # Every mask as one additive fp64 mask (N, H, L, S) with -inf, and the rows that see a key.
    add = torch.zeros(N, H, L, S, dtype=torch.float64)
    if mask is not None:
        add = add + (torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask.double())
    if kpm is not None:
        kpm_add = torch.where(kpm, -math.inf, 0.0) if kpm.dtype == torch.bool else kpm.double()
        add = add + kpm_add[:, None, None, :]
    if causal:
        off = S - L if causal == "bottom_right" else 0
        add = add.masked_fill(torch.arange(S)[None] > torch.arange(L)[:, None] + off, -math.inf)
    return add, (add > -math.inf).any(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,S,Hk,group,E,Ev", [(65, 513, 2, 3, 40, 24), (257, 130, 1, 2, 80, 72),
                                               (130, 600, 2, 1, 64, 64), (7, 9, 1, 1, 16, 16)])
@pytest.mark.parametrize("kind", ["none", "bool", "float", "kpm_bool", "kpm_float"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_half_types_within_twice_torchs_error_on_masks_causal_gqa(dtype, L, S, Hk, group, E, Ev,
                                                                   kind, causal):
    # FlashAttention's rule: output, lse and gradients against fp64 on the same rounded inputs,
    # at most twice the error of PyTorch's SDPA in the same dtype (same masks as one additive
    # mask), plus 1e-4 and a quarter of the dtype's epsilon at the largest value. Where SDPA
    # runs fp32 inside (GQA with a mask takes its math path) its gradients are rounded from
    # nearly exact values, while D = rowsum(dO * O) here reads O rounded to the dtype, as
    # FlashAttention's does: dQ, dK up to 2.8x its error, 0.15 epsilon at the largest value
    # past 2x. Rows that see no key are left out (0 here, NaN in torch).
    N, H = 2, Hk * group
    q = rand(N, H, L, E, dtype=dtype).double()
    k, v = rand(N, Hk, S, E, dtype=dtype).double(), rand(N, Hk, S, Ev, dtype=dtype).double()
    mask, kpm = masks(kind, N, H, L, S, dtype)
    add, seen = _one_float_mask(N, H, L, S, mask, kpm, causal)
    g = rand(N, H, L, Ev, dtype=dtype).double() * seen[..., None]
    kw = dict(is_causal=causal is not None, causal_alignment=causal or "top_left",
              enable_gqa=True, key_padding_mask=kpm)
    lo = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ours, _, lse = fusedattn.attention(*lo, mask, return_lse=True, **kw)
    our_grads = torch.autograd.grad(ours, lo, g.to(dtype))
    hi = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_attention(*hi, mask, kpm, causal is not None, causal == "bottom_right")
    ref_grads = torch.autograd.grad(ref, hi, g)
    scores = q @ k.repeat_interleave(group, 1).transpose(-2, -1) * E ** -0.5 + add
    ref_lse = torch.logsumexp(scores, -1)
    safe = torch.where(seen[..., None], add, 0.0).to(dtype)  # torch's dead rows stay finite
    lo2 = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    theirs = torch.nn.functional.scaled_dot_product_attention(*lo2, attn_mask=safe, enable_gqa=True)
    their_grads = torch.autograd.grad(theirs, lo2, g.to(dtype))
    kk = lo2[1].detach().repeat_interleave(group, 1)  # lse does not read V: K stands in
    _, their_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        lo2[0].detach(), kk, kk, 0.0, False, attn_mask=safe)
    rows = seen[..., None]
    pairs = [("out", ours * rows, theirs * rows, ref * rows),
             ("lse", lse[seen], their_lse[seen], ref_lse[seen])]
    pairs += list(zip(("dq", "dk", "dv"), our_grads, their_grads, ref_grads))
    for name, a, b, r in pairs:
        if not r.numel():
            continue
        err, torch_err = ((x.double() - r).abs().max().item() for x in (a, b))
        ulp_term = torch.finfo(dtype).eps * r.abs().max().item() / 4
        assert err <= 2 * torch_err + 1e-4 + ulp_term, (name, err, torch_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("S", [600, 601])  # 601: the packed P V product's odd last block
def test_half_types_weights_error_at_most_twice_torchs(dtype, causal, S):
    # Returned weights and the output they give, against the fp64 formula, next to torch's
    # math in the same dtype. L = 130 queries per key/value head: bf16 takes the packed path
    # (K^T and V packed; Ev = 72 spans two of V's 64-column panels).
    N, H, L, E, Ev = 2, 3, 130, 40, 72
    q, k = (rand(N, H, n, E, dtype=torch.float64) for n in (L, S))
    v = rand(N, H, S, Ev, dtype=torch.float64)
    kpm = torch.rand(N, S) > 0.8
    ref, ref_w = reference_attention(q, k, v, key_padding_mask=kpm, is_causal=causal,
                                     bottom_right=True)
    lo = [t.to(dtype) for t in (q, k, v)]
    ours, w, _ = fusedattn.attention(*lo, key_padding_mask=kpm, is_causal=causal,
                                     causal_alignment="bottom_right", return_weights=True)
    allowed = ~kpm[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(S)[None] <= torch.arange(L)[:, None] + S - L)
    s = (lo[0] @ lo[1].transpose(-2, -1)) * E ** -0.5
    their_w = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    theirs = their_w @ lo[2]
    for a, b, r in ((ours, theirs, ref), (w, their_w, ref_w)):
        err = (a.double() - r).abs().max().item()
        torch_err = (b.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-4, (err, torch_err)


def _run_with_reference_kernel(code):
    env = dict(os.environ, FUSEDATTN_CPU_KERNEL="reference")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("weights", [False, True])
def test_dropout_mask_is_the_reference_paths_mask(tmp_path, weights):
    """Both paths draw dropout from the same counter-based generator: identical outputs and
    gradients under one seed; returned weights are the probabilities before dropout."""
    run = f"""
torch.manual_seed(0)
q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64, requires_grad=True) for n in (70, 530, 530))
torch.manual_seed(1)
out, w, _ = fusedattn.attention(q, k, v, dropout_p=0.3, is_causal=True, causal_alignment="bottom_right",
                                return_weights={weights}, return_lse=True)
out.backward(torch.ones_like(out))
w = torch.zeros(0) if w is None else w
"""
    _run_with_reference_kernel(f"""
import torch, fusedattn
{run}
torch.save((out.detach(), w.detach(), q.grad, k.grad, v.grad), r"{tmp_path}/result.pt")
""")
    ref = torch.load(tmp_path / "result.pt")
    scope = {"torch": torch, "fusedattn": fusedattn}
    exec(run, scope)
    got = [scope["out"].detach(), scope["w"].detach()] + [scope[n].grad for n in "qkv"]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    if weights:  # rows sum to 1 where a key is visible (bottom-right: all 70 queries see some)
        torch.testing.assert_close(got[1].sum(-1), torch.ones(2, 3, 70, dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_fp64_dropout_scales_by_the_fp64_keep_scale(monkeypatch, kernel):
    # With V = I the output is P * M / (1 - p) itself: its kept entries over P are 1 / (1 - p)
    # to fp64 precision (the scale was rounded to fp32: 4.8e-8 relative at p = 0.1).
    if kernel == "reference":
        monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "reference")
    q, k = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 3, 7, 4, dtype=torch.float64)
    v = torch.eye(7, dtype=torch.float64).expand(2, 3, 7, 7)
    torch.manual_seed(1)
    out, w, _ = fusedattn.attention(q, k, v, dropout_p=0.1, return_weights=True)
    kept = out != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(out[kept] / w[kept], torch.full_like(w[kept], 1 / 0.9),
                               atol=0, rtol=1e-14)


def test_mha_layout_strides_are_read_in_place():
    # The module hands the op (N, H, L, D) views of (L, N, H*D) projections: not contiguous.
    L, N, H, D = 70, 3, 4, 16
    x = rand(L, N, 3 * H * D)
    q, k, v = (t.reshape(L, N, H, D).permute(1, 2, 0, 3) for t in x.chunk(3, -1))
    assert not q.is_contiguous()
    torch.testing.assert_close(fusedattn.attention(q, k, v, is_causal=True).double(),
                               reference_attention(q, k, v, is_causal=True)[0], atol=2e-5, rtol=2e-5)


def test_broadcast_mask_is_not_materialised():
    # A (1, 1, 1, S) mask broadcast to (N, H, L, S) is read through stride-0 views.
    N, H, L, S = 2, 2, 300, 700
    q, k, v = rand(N, H, L, 8), rand(N, H, S, 8), rand(N, H, S, 8)
    mask = (torch.rand(S) > 0.5).view(1, 1, 1, S)
    torch.testing.assert_close(fusedattn.attention(q, k, v, mask).double(),
                               reference_attention(q, k, v, mask)[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [4, 300])  # 300: bf16 takes the packed (AMX) path where it can
@pytest.mark.parametrize("weights", [False, True])
def test_nan_inputs_are_not_hidden(dtype, L, weights):
    q, k, v = rand(1, 1, L, 8, dtype=dtype), rand(1, 1, 600, 8, dtype=dtype), rand(1, 1, 600, 8, dtype=dtype)
    k[0, 0, 3, 0] = float("nan")
    out, w, _ = fusedattn.attention(q, k, v, return_weights=weights, return_lse=True)
    assert out.isnan().all()
    if weights:  # a NaN score makes its row's sum, so the whole row, NaN
        assert w.isnan().all()
    k[0, 0, 3, 0] = 0.0
    v[0, 0, 7, 0] = float("nan")
    out2, w2, _ = fusedattn.attention(q, k, v, return_weights=weights, return_lse=True)
    assert out2[..., 0].isnan().all() and not out2[..., 1:].isnan().any()
    if weights:
        assert not w2.isnan().any()


@pytest.mark.parametrize("where", ["grad_out", "query"])
def test_nan_reaches_the_gradients(where):
    # bf16 with 300 queries: the keys-as-rows backward where the CPU has it.
    q, k, v = (rand(1, 2, n, 64, dtype=torch.bfloat16, requires_grad=True) for n in (300, 333, 333))
    g = torch.randn(1, 2, 300, 64, dtype=torch.bfloat16)
    if where == "grad_out":
        g[0, 1, 5, 0] = float("nan")
    else:
        q.data[0, 1, 5, 0] = float("nan")
    out = fusedattn.attention(q, k, v, is_causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    # head 1's gradients see the NaN, head 0's do not
    for t in (dk, dv):
        assert t[0, 1].isnan().any() and not t[0, 0].isnan().any()
    assert dq[0, 1, 5].isnan().any() and not dq[0, 0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [65, 300])  # 300 fp32 queries: the keys-as-rows backward where the CPU has it
@pytest.mark.parametrize("case", ["one_key", "causal", "padding", "bool_mask", "float_mask"])
def test_rows_that_see_one_key_have_exactly_zero_gradients(dtype, L, case):
    # Softmax over one visible key is 1 whatever the score: dS, so dQ of that row and its share
    # of dK, are exactly 0 (PyTorch's math path gives 0; a D from rowsum(dO * O) differs from
    # the GEMM's dP by rounding).
    N, H, S, E = 2, 2, 1 if case == "one_key" else 333, 32
    q = rand(N, H, L, E, dtype=dtype, requires_grad=True)
    k, v = (rand(N, H, S, E, dtype=dtype, requires_grad=True) for _ in range(2))
    kw, one = {}, torch.zeros(N, H, L, dtype=torch.bool)  # one: rows that see one key
    if case == "one_key":
        one[:] = True
    elif case == "causal":
        kw = dict(is_causal=True)
        one[:, :, 0] = True
    elif case == "padding":
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[1, 1:] = True  # the second sequence has one token
        kw = dict(key_padding_mask=kpm)
        one[1] = True
    else:
        allowed = torch.rand(N, H, L, S) > 0.3
        allowed[:, :, ::7] = False
        allowed[:, :, ::7, 11] = True  # every 7th query sees key 11 only
        one[:, :, ::7] = True
        mask = allowed if case == "bool_mask" else torch.zeros(N, H, L, S, dtype=dtype).masked_fill(~allowed, float("-inf"))
        kw = dict(attn_mask=mask)
    out = fusedattn.attention(q, k, v, **kw)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    assert (dq[one] == 0).all()
    if case in ("one_key", "padding"):  # every query of these sequences sees one key
        b = slice(None) if case == "one_key" else 1
        assert (dk[b] == 0).all()
    mask = kw.get("attn_mask")
    kpm = kw.get("key_padding_mask")
    ref, _ = reference_attention(q, k, v, mask, kpm, kw.get("is_causal", False))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    tol = 5e-5 if dtype == torch.float32 else 1e-10
    for a, r in zip((dq, dk, dv), ref_grads):
        torch.testing.assert_close(a.double(), r.double(), atol=tol, rtol=tol)
    # lse's own gradient still reaches such rows (d lse / d s = 1 at the one key), and a NaN
    # in grad_out still reaches dQ.
    out, _, lse = fusedattn.attention(q, k, v, return_lse=True, **kw)
    (dq_lse,) = torch.autograd.grad(lse.sum(), q)
    ref_lse = torch.logsumexp(_masked_scores(q, k, mask, kpm, kw.get("is_causal", False)), -1)
    (ref_dq_lse,) = torch.autograd.grad(ref_lse.sum(), q)
    torch.testing.assert_close(dq_lse.double(), ref_dq_lse.double(), atol=tol, rtol=tol)
    g_nan = g.clone()
    g_nan[0, 0, 0, 0] = float("nan")
    (dq,) = torch.autograd.grad(fusedattn.attention(q, k, v, **kw), q, g_nan)
    assert dq[0, 0, 0].isnan().all() and not dq[0, 1].isnan().any()


def _masked_scores(q, k, mask, kpm, causal):
    s = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if kpm is not None:
        s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.arange(S)[None] > torch.arange(L)[:, None], float("-inf"))
    return s


@pytest.mark.parametrize("L,S,E", [(65, 2048, 64), (130, 1031, 40)])
def test_fp16_gradients_keep_their_digits_under_a_small_grad_out(L, S, E):
    # dS = P (dP - D) with P ~ 1/S and grad_out ~ 1e-3 lies below fp16's smallest normal;
    # rounded as is, dQ had 10x the error of PyTorch's math path (fp32 inside). Relative
    # errors against fp64 on the same fp16 inputs, at most twice the math path's.
    q, k, v = (rand(1, 2, n, E, dtype=torch.float16) for n in (L, S, S))
    g = (torch.randn(1, 2, L, E) * 1e-3).half()
    ours = _grads(fusedattn.attention, q, k, v, g)
    theirs = _grads(lambda *a: torch.ops.aten._scaled_dot_product_attention_math(*a)[0], q, k, v, g)
    ref = _grads(torch.nn.functional.scaled_dot_product_attention, q.double(), k.double(),
                 v.double(), g.double())
    for a, b, r in zip(ours, theirs, ref):
        err, torch_err = ((x.double() - r).abs().max() / r.abs().max() for x in (a, b))
        assert err <= 2 * torch_err, (err, torch_err)


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), g)


def test_zero_length_sequences_with_weights_and_gradients():
    for L, S in ((0, 5), (3, 0)):
        q = rand(1, 2, L, 4, requires_grad=True)
        k, v = rand(1, 2, S, 4, requires_grad=True), rand(1, 2, S, 3, requires_grad=True)
        out, w, lse = fusedattn.attention(q, k, v, return_weights=True, return_lse=True)
        assert out.shape == (1, 2, L, 3) and w.shape == (1, 2, L, S) and (out == 0).all()
        assert torch.isneginf(lse).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(g.shape == t.shape and (g == 0).all() for g, t in zip(grads, (q, k, v)))


def test_fully_masked_rows_across_blocks_zero_output_and_grads():
    q = rand(1, 2, 130, 8, requires_grad=True)
    k, v = rand(1, 2, 700, 8, requires_grad=True), rand(1, 2, 700, 8, requires_grad=True)
    # bottom-right with L > S: the first L - S queries see nothing
    out, w, lse = fusedattn.attention(q, k[:, :, :100], v[:, :, :100], is_causal=True,
                                      causal_alignment="bottom_right", return_weights=True,
                                      return_lse=True)
    assert (out[:, :, :30] == 0).all() and (w[:, :, :30] == 0).all()
    assert torch.isneginf(lse[:, :, :30]).all() and not out.isnan().any()
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert (gq[:, :, :30] == 0).all() and not gq.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,Ev", [(1, 1), (2, 1), (64, 64)])
def test_expanded_grad_and_odd_strides_reach_blas_correctly(dtype, E, Ev):
    # out.sum().backward() hands the backward a grad_out of row stride 0, and a single-row
    # matrix may carry any row stride; BLAS rejects such leading dimensions and skips the
    # product, which once left the gradients wrong without an error.
    N, H, L, S = 2, 3, 1 if E == 64 else 7, 9
    q = torch.randn(N, H, E * L).as_strided((N, H, L, E), (H * L * E, L * E, 1, 1)) \
        if L == 1 else torch.randn(N, H, L, E)
    q = q.to(dtype).requires_grad_()
    k = torch.randn(N, H, S, E, dtype=dtype, requires_grad=True)
    v = torch.randn(N, H, S, Ev, dtype=dtype, requires_grad=True)
    fusedattn.attention(q, k, v).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference_attention(q64, k64, v64)[0].sum().backward()
    tol = 1e-9 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 5e-2)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("E,Ev,S", [(64, 64, 1031), (80, 40, 513), (2, 130, 7), (32, 33, 100),
                                    (64, 100, 300)])
@pytest.mark.parametrize("extra", ["plain", "causal_tl", "causal_br", "bool_mask", "bool_kpm",
                                   "float_kpm", "dropout", "causal_dropout"])
@pytest.mark.parametrize("weights", [False, True])
def test_packed_forward_matches_unpacked(monkeypatch, dtype, E, Ev, S, extra, weights):
    # bf16/fp16 forwards with >= 128 queries per key/value head multiply by K^T and V blocks
    # packed once (oneDNN brgemm, where the CPU has AMX); "unpacked" multiplies in place.
    # Same rounding of P to the input type, so the two differ only by summation order. bf16
    # without attn_mask or dropout takes the keys-as-rows path (S^T = K Q^T, P^T packed by the
    # exp pass) where the CPU has AVX512-BF16. causal_br with S = 7 < L and bool_kpm with a
    # fully padded batch give rows with no visible key (0 out, lse -inf). causal_dropout with
    # Ev = 100: causal products stop early in V's blocks, whose second 64-column panel must
    # still be found (it once was not: a wrong output). weights: the kernel
    # that forms whole score rows. fp32 with >= 512 queries per key/value head runs its
    # products on brgemm (oneDNN's fp32 kernels) with K^T formed once; "unpacked" keeps MKL's
    # sgemm.
    N, H, Hk = 2, 4, 2
    L = 257 if dtype == torch.float32 else 131
    gen = torch.Generator().manual_seed(E + S)
    q = torch.randn(N, H, L, E, generator=gen).to(dtype)
    k = torch.randn(N, Hk, S, E, generator=gen).to(dtype)
    v = torch.randn(N, Hk, S, Ev, generator=gen).to(dtype)
    kw = dict(enable_gqa=True, return_lse=True, return_weights=weights)
    if extra.startswith("causal"):
        kw.update(is_causal=True, causal_alignment="bottom_right" if extra == "causal_br" else "top_left")
    elif extra == "bool_mask":
        kw["attn_mask"] = torch.rand(N, 1, L, S, generator=gen) > 0.3
    elif extra == "bool_kpm":
        kw["key_padding_mask"] = torch.rand(N, S, generator=gen) > 0.6
        kw["key_padding_mask"][0] = True
    elif extra == "float_kpm":
        kw["key_padding_mask"] = torch.randn(N, S, generator=gen).to(dtype)
    if extra.endswith("dropout"):
        kw["dropout_p"] = 0.2

    def run(*qkv, **override):
        torch.manual_seed(7)
        out, w, lse = fusedattn.attention(*qkv, **{**kw, **override})
        return out.double(), lse, (w.double() if weights else None)

    packed = run(q, k, v)
    monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "unpacked")
    unpacked = run(q, k, v)
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(packed[0], unpacked[0], atol=tol, rtol=0)
    torch.testing.assert_close(packed[1], unpacked[1], atol=1e-4, rtol=1e-5)
    assert not packed[0].isnan().any()
    if weights:  # both round the same fp32 probabilities
        torch.testing.assert_close(packed[2], unpacked[2], atol=tol / 4, rtol=0)
    # And against fp64 under the same seed: a mistake both paths shared passes the above.
    override = {}
    if extra == "float_kpm":
        override["key_padding_mask"] = kw["key_padding_mask"].double()
    exact = run(q.double(), k.double(), v.double(), **override)
    torch.testing.assert_close(packed[0], exact[0], atol=3 * tol, rtol=0)
    if weights:
        torch.testing.assert_close(packed[2], exact[2], atol=tol / 2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("E,Ev,S", [(64, 64, 1031), (80, 40, 513), (32, 100, 77), (64, 128, 300),
                                    (24, 20, 130)])
@pytest.mark.parametrize("extra", ["plain", "causal_tl", "causal_br", "bool_kpm", "float_kpm"])
def test_packed_backward_matches_unpacked_and_fp64(monkeypatch, dtype, E, Ev, S, extra):
    # bf16 backwards with >= 128 queries per key/value head run keys-as-rows on packed
    # products (brgemm) where the CPU has AMX and AVX512-BF16; "unpacked" keeps the query-rows
    # backward on MKL. GQA, odd S (an odd last key block), L not a multiple of 64, Ev != E,
    # Ev > 64 (two packed panels), lse's gradient, rows with no visible key (causal_br with
    # S < L, a fully padded batch). fp32 runs the same order of work on brgemm (plain
    # row-major operands; AVX-512), "unpacked" the query-rows backward on MKL.
    N, H, Hk, L = 2, 4, 2, 131
    gen = torch.Generator().manual_seed(E + S)
    q64 = torch.randn(N, H, L, E, generator=gen, dtype=torch.float64)
    k64 = torch.randn(N, Hk, S, E, generator=gen, dtype=torch.float64)
    v64 = torch.randn(N, Hk, S, Ev, generator=gen, dtype=torch.float64)
    kw = dict(enable_gqa=True, return_lse=True)
    if extra.startswith("causal"):
        kw.update(is_causal=True, causal_alignment="bottom_right" if extra == "causal_br" else "top_left")
    elif extra == "bool_kpm":
        kw["key_padding_mask"] = torch.rand(N, S, generator=gen) > 0.6
        kw["key_padding_mask"][0] = True
    elif extra == "float_kpm":
        kw["key_padding_mask"] = torch.randn(N, S, generator=gen, dtype=torch.float64)
    g = torch.randn(N, H, L, Ev, generator=gen, dtype=torch.float64)
    glse = torch.randn(N, H, L, generator=gen, dtype=torch.float64)

    def grads(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
        over = {}
        if extra == "float_kpm":
            over["key_padding_mask"] = kw["key_padding_mask"].to(dtype)
        out, _, lse = fusedattn.attention(*leaves, **{**kw, **over})
        glse_d = glse.to(lse.dtype).masked_fill(torch.isneginf(lse), 0)
        got = torch.autograd.grad((out, lse), leaves, (g.to(dtype), glse_d))
        return [t.double() for t in got]

    exact = grads(torch.float64)
    packed = grads(dtype)
    monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "unpacked")
    unpacked = grads(dtype)
    # bf16 keeps 8 bits (2^-8 of the largest gradient), a few roundings deep; seen here: up to
    # 0.0067 between the two, 0.010 from fp64. fp32: summation order only.
    tol_between, tol_exact = (0.012, 0.018) if dtype == torch.bfloat16 else (2e-6, 5e-6)
    for a, b, r in zip(packed, unpacked, exact):
        assert not a.isnan().any()
        scale = r.abs().max().item() + 1e-3
        torch.testing.assert_close(a, b, atol=tol_between * scale, rtol=0)
        torch.testing.assert_close(a, r, atol=tol_exact * scale, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_forward_reads_strided_views(monkeypatch, dtype, causal):
    # q, k, v as views of wider tensors with odd row strides (E + 1 elements): the bf16
    # keys-as-rows path gathers Q's element pairs at unaligned offsets and hands K's rows to
    # the GEMM with that stride; fp32 transposes K (forward), Q and dO (backward) by gathers
    # and hands V's, K's, Q's and dO's rows to brgemm with it.
    N, H, S, E = 2, 3, 333, 64
    L = 520 if dtype == torch.float32 else 200  # fp32's brgemm forward: >= 512 queries
    gen = torch.Generator().manual_seed(3)
    wide = [torch.randn(N, n, H, E + 1, generator=gen).to(dtype) for n in (L, S, S)]
    kpm = torch.rand(N, S, generator=gen) > 0.7
    g = torch.randn(N, L, H, E + 1, generator=gen).to(dtype)[..., :E].transpose(1, 2)

    def run():
        q, k, v = (t.clone().requires_grad_() for t in wide)
        qs, ks, vs = (t[..., :E].transpose(1, 2) for t in (q, k, v))
        assert qs.stride(-2) == H * (E + 1)
        out, _, lse = fusedattn.attention(qs, ks, vs, key_padding_mask=kpm, is_causal=causal,
                                          return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), g) if dtype == torch.float32 else ()
        return [out.double(), lse] + [t.double() for t in grads]

    got = run()
    monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "unpacked")
    ref = run()
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got[0], ref[0], atol=atol, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-5)
    for a, b in zip(got[2:], ref[2:]):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("L", [10, 200, 520])  # 200, 520: brgemm / keys-as-rows paths
@pytest.mark.parametrize("kpm_kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_trailing_key_padding_is_skipped(monkeypatch, dtype, L, kpm_kind, causal, weights):
    # Keys after a batch's last unpadded key are skipped (forward and backward): the same
    # numbers as the reference path, which multiplies them by 0. Batch 1 ends on an odd key
    # inside a block (the packed paths' pair rows), batch 2 is all padding, batch 0 has
    # interior padding only.
    N, H, S, E = 3, 2, 601, 32
    gen = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(N, H, n, E, generator=gen).to(dtype) for n in (L, S, S))
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[0, 100:140] = True
    pad[1, 333:] = True
    pad[2, :] = True
    kpm = pad if kpm_kind == "bool" else torch.zeros(N, S, dtype=dtype).masked_fill(pad, float("-inf"))
    g = torch.randn(N, H, L, E, generator=gen).to(dtype)
    kw = dict(key_padding_mask=kpm, is_causal=causal, causal_alignment="bottom_right",
              return_weights=weights, return_lse=True)

    def run(k, v):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, w, lse = fusedattn.attention(*leaves, **kw)
        return [out, lse] + ([w] if weights else []) + list(torch.autograd.grad(out, leaves, g))

    got = run(k, v)
    monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "reference")
    ref = run(k, v)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for a, c in zip(got, ref):
        assert not a.isnan().any()
        torch.testing.assert_close(a.double(), c.double(), atol=tol * (c.abs().max().item() + 1), rtol=0)
    assert (got[0][2] == 0).all() and torch.isneginf(got[1][2]).all()  # all padding: 0, lse -inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("L", [5, 300])
def test_one_key_rows_with_an_outside_lse_take_the_general_formula(dtype, L):
    # A backward given the lse and output of a larger softmax (ring attention merges shards
    # that way): a row that sees one key of this call has p < 1 there, and its gradient is
    # p (dP - D), not the exact zero of a row whose whole softmax is that key.
    g = torch.Generator().manual_seed(L)
    N, H, S, E = 1, 2, 64, 32
    q, k, v = (torch.randn(N, H, n, E, generator=g).to(dtype) for n in (L, S, S))
    kpm = torch.ones(N, S, dtype=torch.bool)
    kpm[0, 3] = False  # one visible key
    scale = E ** -0.5
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    lse = (s[..., 3] + 0.7).to(torch.float64 if dtype == torch.float64 else torch.float32)
    out = torch.randn(N, H, L, E, generator=g).to(dtype)
    dout = torch.randn(N, H, L, E, generator=g).to(dtype)
    dq, dk, dv, *_ = torch.ops.fusedattn._attention_backward(
        dout, None, None, q, k, v, out, lse, None, kpm, None, 0.0, False, False, None, False,
        False, False)
    p = torch.exp(s[..., 3] - lse.double())  # exp(-0.7)
    d = (dout.double() * out.double()).sum(-1)
    dp = dout.double() @ v.double()[..., 3, :].unsqueeze(-1)
    ds = p * (dp.squeeze(-1) - d)
    want_dq = ds.unsqueeze(-1) * scale * k.double()[..., 3:4, :]
    tol = 1e-9 if dtype == torch.float64 else (2e-5 if dtype == torch.float32 else 5e-2)
    torch.testing.assert_close(dq.double(), want_dq, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("extra", ["plain", "attn_mask", "causal_br", "window"])
@pytest.mark.parametrize("S", [301, 600])
def test_trailing_padding_is_never_read(monkeypatch, dtype, extra, S):
    # NaN in the keys and values past a batch's last unpadded key (an odd position, inside a
    # packed panel and a key pair) changes nothing: the packed paths (AMX, or the portable
    # packed GEMM where the CPU has AVX512-BF16 only) once multiplied the first of them by a
    # zero probability, and 0 * NaN reached O, dQ and dK. Against the same call with zeros there.
    monkeypatch.setenv("FUSEDATTN_PACKED_GEMM", "reference")
    gen = torch.Generator().manual_seed(S)
    L, ke = (600 if dtype == torch.float32 else 200), 251
    q, k, v = (torch.randn(2, 2, n, 64, generator=gen).to(dtype) for n in (L, S, S))
    g = torch.randn(2, 2, L, 64, generator=gen).to(dtype)
    kpm = torch.zeros(2, S, dtype=torch.bool)
    kpm[:, ke:] = True
    kw = {"attn_mask": dict(attn_mask=torch.rand(L, S, generator=gen) > 0.2),
          "causal_br": dict(is_causal=True, causal_alignment="bottom_right"),
          "window": dict(window=(100, 20)), "plain": {}}[extra]

    def run(fill):
        kk, vv = k.clone(), v.clone()
        kk[:, :, ke:], vv[:, :, ke:] = fill, fill
        leaves = [t.requires_grad_() for t in (q.clone(), kk, vv)]
        out = fusedattn.attention(*leaves, key_padding_mask=kpm, **kw)
        out.backward(g)
        return [out] + [t.grad[:, :, :ke] if i else t.grad for i, t in enumerate(leaves)]

    for got, want in zip(run(float("nan")), run(0.0)):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("L", [5, 600])  # 600: the JIT GEMM paths (forward, keys-as-rows backward)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,Ev", [(8, 0), (0, 4), (0, 0)])
def test_empty_head_dims_are_answers(L, dtype, E, Ev):
    # An empty value dim gives an empty output, an empty key dim (scale given) uniform weights;
    # the JIT GEMM cannot take an empty dim (it once raised std::bad_alloc), so the plan keeps
    # such calls off it.
    gen = torch.Generator().manual_seed(L)
    q = torch.randn(2, 3, L, E, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(2, 3, L + 2, E, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(2, 3, L + 2, Ev, generator=gen).to(dtype).requires_grad_()
    out = fusedattn.attention(q, k, v, scale=0.5)
    assert out.shape == (2, 3, L, Ev) and out.dtype == dtype
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=0)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and not t.grad.isnan().any()

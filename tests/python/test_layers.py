"""The single-head layers (self-attention, attention pooling, Gaussian-kernel attention)
against their formulas, written out here."""
import copy
import math

import pytest
import torch

import fusedattn


def test_self_attention_matches_seed_formula_with_padding_and_causal():
    torch.manual_seed(0)
    m = fusedattn.SelfAttention(6, 4, d_v=5).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for causal in (False, True):
        out, w = m(x, key_padding_mask=pad, is_causal=causal)
        q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
        s = q @ k.transpose(1, 2) / math.sqrt(4)
        s = s.masked_fill(pad[:, None, :], -math.inf)
        if causal:
            s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -math.inf)
        p = torch.softmax(s, -1)
        torch.testing.assert_close(out, p @ v)
        torch.testing.assert_close(w, p)
        g1 = torch.autograd.grad(out.sum(), [x] + list(m.parameters()))
        g2 = torch.autograd.grad((p @ v).sum(), [x] + list(m.parameters()))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
    out1, _ = m(x[0])  # unbatched
    torch.testing.assert_close(out1, m(x[:1])[0][0])


@pytest.mark.parametrize("score", ["luong", "bahdanau"])
def test_attention_pooling_matches_seed_formula(score):
    torch.manual_seed(1)
    m = fusedattn.AttentionPooling(4, units=6, score=score).double()
    h = torch.randn(3, 5, 4, dtype=torch.float64)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2, 3:] = True
    out, w = m(h, key_padding_mask=pad)
    lengths = (~pad).sum(1)
    h_t = h[torch.arange(3), lengths - 1]  # last step that is not padding
    if score == "luong":
        s = (m.score_proj(h) * h_t[:, None]).sum(-1)
    else:
        s = torch.tanh(m.query_proj(h_t)[:, None] + m.score_proj(h)) @ m.score_vector
    p = torch.softmax(s.masked_fill(pad, -math.inf), -1)
    ctx = (p[..., None] * h).sum(1)
    torch.testing.assert_close(w, p)
    torch.testing.assert_close(out, torch.tanh(m.output_proj(torch.cat([ctx, h_t], -1))))
    assert torch.autograd.gradcheck(lambda h: m(h, key_padding_mask=pad)[0],
                                    (h.clone().requires_grad_(),))


def test_gaussian_kernel_attention_is_nadaraya_watson():
    torch.manual_seed(2)
    xq = torch.linspace(0, 5, 11, dtype=torch.float64)
    xk = torch.rand(17, dtype=torch.float64) * 5
    yk = torch.sin(xk)
    out, w = fusedattn.gaussian_kernel_attention(xq, xk, yk, bandwidth=0.6, need_weights=True)
    p = torch.softmax(-((xq[:, None] - xk[None]) ** 2) / (2 * 0.36), -1)
    torch.testing.assert_close(w, p)
    torch.testing.assert_close(out, p @ yk)
    # vector points, batched
    q, k, v = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 8, 3, dtype=torch.float64), \
        torch.randn(2, 8, 4, dtype=torch.float64)
    p = torch.softmax(-torch.cdist(q, k) ** 2 / 2, -1)
    torch.testing.assert_close(fusedattn.gaussian_kernel_attention(q, k, v), p @ v)


def test_gaussian_kernel_attention_far_from_the_origin_keeps_fp32_accuracy():
    # Points near 1e4: q.k and |k|^2 are ~1e8 each; uncentred their difference cancelled to an
    # fp32 error of 0.73. Gradients (points and bandwidth) against the fp64 formula too.
    torch.manual_seed(3)
    xq = (1e4 + torch.rand(7, 2) * 3).requires_grad_()
    xk = (1e4 + torch.rand(13, 2) * 3).requires_grad_()
    yk = torch.randn(13, 3)
    b = torch.tensor([0.5], requires_grad=True)
    out = fusedattn.gaussian_kernel_attention(xq, xk, yk, bandwidth=b)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (xq, xk, b), g)
    hq, hk, hb = (t.detach().double().requires_grad_() for t in (xq, xk, b))
    d2 = ((hq[:, None] - hk[None]) ** 2).sum(-1)
    ref = torch.softmax(-d2 / (2 * hb * hb), -1) @ yk.double()
    ref_grads = torch.autograd.grad(ref, (hq, hk, hb), g.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, atol=2e-3, rtol=2e-3)


def test_gaussian_kernel_module_learns_its_bandwidth_with_correct_gradient():
    m = fusedattn.GaussianKernelAttention(0.8).double()
    xq, xk = torch.rand(6, dtype=torch.float64), torch.rand(9, dtype=torch.float64)
    yk = torch.cos(xk)
    assert torch.autograd.gradcheck(
        lambda b: fusedattn.gaussian_kernel_attention(xq, xk, yk, bandwidth=b),
        (torch.tensor([0.8], dtype=torch.float64, requires_grad=True),))
    out, _ = m(xq, xk, yk)
    out.sum().backward()  # an expanded (row stride 0) gradient reaches the kernel
    b = torch.tensor([0.8], dtype=torch.float64, requires_grad=True)
    d = xq[:, None] - xk[None]
    (torch.softmax(-d * d / (2 * b * b), -1) @ yk).sum().backward()
    torch.testing.assert_close(m.bandwidth.grad, b.grad)
    fixed = fusedattn.GaussianKernelAttention(0.8, learnable=False)
    assert list(fixed.parameters()) == [] and "bandwidth" in fixed.state_dict()


def test_state_dict_round_trip_and_deepcopy():
    for make in (lambda: fusedattn.SelfAttention(6, 4), lambda: fusedattn.AttentionPooling(6, 8, "bahdanau"),
                 lambda: fusedattn.GaussianKernelAttention(0.5)):
        a, b = make(), make()
        b.load_state_dict(a.state_dict())
        c = copy.deepcopy(a)
        for (n1, p1), (n2, p2), (_, p3) in zip(a.state_dict().items(), b.state_dict().items(),
                                               c.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2) and torch.equal(p1, p3)


def test_cpp_and_python_modules_agree():
    cpp = fusedattn._C.cpp.SelfAttention(6, 4)
    py = fusedattn.SelfAttention(6, 4)
    py.load_state_dict(dict(cpp.named_parameters(True)))
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(cpp.forward(x)[0], py(x)[0])


def test_layers_compile_fullgraph():
    m = fusedattn.SelfAttention(6, 4)
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x)[0], m(x)[0])


@pytest.mark.parametrize("call,message", [
    (lambda: fusedattn.SelfAttention(6, 4)(torch.randn(2, 5, 7)), "in_dim = 6"),
    (lambda: fusedattn.SelfAttention(6, 4)(torch.randn(2, 5, 6), torch.zeros(2, 4, dtype=torch.bool)),
     r"key_padding_mask must have shape \(N, T\) = \(2, 5\)"),
    (lambda: fusedattn.AttentionPooling(6, score="dot"), "score must be"),
    (lambda: fusedattn.AttentionPooling(6)(torch.randn(2, 6)), r"input must be \(N, T, input_dim\)"),
    (lambda: fusedattn.gaussian_kernel_attention(torch.rand(3, 2), torch.rand(4, 3), torch.rand(4)),
     "must share D"),
    (lambda: fusedattn.GaussianKernelAttention(-1.0), "bandwidth must be positive"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()

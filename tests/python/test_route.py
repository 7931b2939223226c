"""torch's route (ops/route.h): the calls torch's scaled_dot_product_attention serves go to it
(the default on CUDA; FUSEDATTN_ROUTE=torch on every device), the rest stay on fusedattn's
kernels. Run here on CPU tensors, the same code path a GPU takes: values and gradients against
the fp64 formula and against fusedattn's own kernels, every mask kind, both causal alignments,
GQA, batch dims, fully masked rows, the module, the KV cache and packed sequences.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedattn
from conftest import reference_attention


@pytest.fixture
def torch_route(monkeypatch):
    monkeypatch.setenv("FUSEDATTN_ROUTE", "torch")


def own(monkeypatch, fn):
    """fn() on fusedattn's own kernels, the setting restored after."""
    with monkeypatch.context() as m:
        m.setenv("FUSEDATTN_ROUTE", "own")
        return fn()


class SdpaCalls(TorchDispatchMode):
    """Whether torch's SDPA ran (a fused kernel, or its math path's _safe_softmax), and the
    shape of the mask each fused kernel got."""

    def __init__(self):
        super().__init__()
        self.ran = False
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if "scaled_dot_product" in name:
            self.ran = True
            mask = kwargs.get("attn_mask")
            if mask is None:
                mask = next((a for a in args[3:] if isinstance(a, torch.Tensor)), None)
            self.masks.append(None if mask is None else tuple(mask.shape))
        elif name == "aten::_safe_softmax":
            self.ran = True
        return func(*args, **kwargs)


def test_explain_names_the_route_and_why(monkeypatch):
    monkeypatch.delenv("FUSEDATTN_ROUTE", raising=False)
    q = torch.randn(2, 4, 5, 8)
    assert fusedattn.explain(q, q, q).startswith("fusedattn CPU kernels")
    monkeypatch.setenv("FUSEDATTN_ROUTE", "torch")
    assert fusedattn.explain(q, q, q, is_causal=True).startswith("torch: scaled_dot_product_attention")
    for kw, why in [(dict(return_weights=True), "return_weights"), (dict(return_lse=True), "return_lse"),
                    (dict(window=(2, 0)), "window"), (dict(softcap=5.0), "softcap"),
                    (dict(alibi_slopes=torch.ones(4)), "alibi"), (dict(rel_bias=torch.zeros(4, 5)), "rel_bias"),
                    (dict(sinks=torch.zeros(4)), "sinks")]:
        assert why in fusedattn.explain(q, q, q, **kw), kw
    mask = torch.zeros(5, 5, requires_grad=True)
    assert "requires grad" in fusedattn.explain(q, q, q, attn_mask=mask)
    with torch.no_grad():
        assert fusedattn.explain(q, q, q, attn_mask=mask).startswith("torch")
    monkeypatch.setenv("FUSEDATTN_ROUTE", "own")
    assert "FUSEDATTN_ROUTE=own" in fusedattn.explain(q, q, q)
    monkeypatch.setenv("FUSEDATTN_ROUTE", "fast")
    with pytest.raises(RuntimeError, match="FUSEDATTN_ROUTE must be"):
        fusedattn.attention(q, q, q)


MASKS = ["none", "bool", "float", "kpm_bool", "kpm_float", "bool+kpm_float", "float+kpm_bool"]


def make_masks(kind, B, H, L, S, dtype):
    attn_mask = kpm = None
    if "bool" in kind.split("+")[0] and not kind.startswith("kpm"):
        attn_mask = torch.rand(L, S) > 0.3
    elif kind.split("+")[0] == "float":
        attn_mask = torch.randn(B, 1, L, S, dtype=dtype)
    if "kpm_bool" in kind:
        kpm = torch.rand(B, S) < 0.3
        kpm[:, 0] = False
    elif "kpm_float" in kind:
        kpm = torch.where(torch.rand(B, S) < 0.3, -math.inf, 0.25).to(dtype)
        kpm[:, 0] = 0
    return attn_mask, kpm


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(7, 11), (11, 7), (9, 9)])
def test_values_and_gradients(torch_route, monkeypatch, mask, causal, L, S):
    B, H, Hk, E, Ev = 2, 4, 2, 12, 5
    q = torch.randn(B, H, L, E, requires_grad=True)
    k = torch.randn(B, Hk, S, E, requires_grad=True)
    v = torch.randn(B, Hk, S, Ev, requires_grad=True)
    attn_mask, kpm = make_masks(mask, B, H, L, S, q.dtype)
    kw = dict(attn_mask=attn_mask, key_padding_mask=kpm, is_causal=causal is not None,
              causal_alignment=causal or "top_left", enable_gqa=True, scale=0.3)

    def run():
        out = fusedattn.attention(q, k, v, **kw)
        return (out, *torch.autograd.grad((out * torch.linspace(-1, 1, Ev)).sum(), (q, k, v)))

    with SdpaCalls() as calls:
        got = run()
    assert calls.ran, "torch's SDPA did not run"
    for shape in calls.masks:  # never expanded over the heads
        assert shape is None or shape[1] == 1
    ref_out, _ = reference_attention(q.detach(), k.detach(), v.detach(), attn_mask, kpm,
                                     causal is not None, causal == "bottom_right", scale=0.3)
    torch.testing.assert_close(got[0].double(), ref_out, atol=2e-5, rtol=2e-5)
    for a, b in zip(got, own(monkeypatch, run)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_gradcheck_fp64(torch_route):
    q = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 6, 3, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False] * 5 + [True], [False] * 6])

    def f(q, k, v):
        return fusedattn.attention(q, k, v, key_padding_mask=kpm, is_causal=True,
                                   causal_alignment="bottom_right")

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("shape", [(3,), (2, 3, 2)])
def test_batch_dims_other_than_one(torch_route, monkeypatch, shape):
    """(H, L, E) and (..., H, L, E): torch's fused kernels take 4-D, the route reshapes."""
    q = torch.randn(*shape[:-1], 4, 6, 8) if len(shape) > 1 else torch.randn(4, 6, 8)
    lead = q.shape[:-3]
    k, v = torch.randn(*lead, 4, 9, 8), torch.randn(*lead, 4, 9, 3)
    kpm = torch.rand(*lead, 9) < 0.3
    mask = torch.randn(*(lead[-1:] if lead else ()), 1, 6, 9)

    def run():
        return fusedattn.attention(q, k, v, attn_mask=mask, key_padding_mask=kpm, is_causal=True,
                                   causal_alignment="bottom_right")

    torch.testing.assert_close(run(), own(monkeypatch, run), atol=2e-5, rtol=2e-5)


def test_fully_masked_rows_give_zero(torch_route):
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[3] = False
    out = fusedattn.attention(q, k, v, attn_mask=mask)
    assert (out[:, :, 3] == 0).all() and not out.isnan().any()
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True
    out = fusedattn.attention(q, k, v, key_padding_mask=kpm)
    assert (out[1] == 0).all() and not out.isnan().any()
    out = fusedattn.attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    assert (out[:, :, :2] == 0).all() and not out.isnan().any()
    assert (fusedattn.attention(q, k[:, :, :0], v[:, :, :0]) == 0).all()


def test_dropout_draws_from_torchs_generator(torch_route):
    q = torch.randn(2, 2, 16, 8)
    torch.manual_seed(1)
    a = fusedattn.attention(q, q, q, dropout_p=0.4)
    torch.manual_seed(1)
    b = fusedattn.attention(q, q, q, dropout_p=0.4)
    assert torch.equal(a, b) and not torch.equal(a, fusedattn.attention(q, q, q))


def test_bad_input_keeps_fusedattns_messages(torch_route):
    q = torch.randn(2, 4, 5, 8)
    with pytest.raises(RuntimeError, match="key_padding_mask must have shape"):
        fusedattn.attention(q, q, q, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="enable_gqa"):
        fusedattn.attention(q, q[:, :2], q[:, :2])


@pytest.mark.parametrize("kpm", [False, True])
def test_module_equals_torchs(torch_route, kpm):
    torch.manual_seed(0)
    ours = fusedattn.MultiheadAttention(32, 4, batch_first=True)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 32, requires_grad=True)
    mask = torch.rand(3, 7) < 0.3 if kpm else None
    if mask is not None:
        mask[:, 0] = False
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    with SdpaCalls() as calls:
        out, _ = ours(x, x, x, key_padding_mask=mask, attn_mask=causal, need_weights=False)
    assert calls.ran
    ref_out, _ = ref(x, x, x, key_padding_mask=mask, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    g, = torch.autograd.grad(out.sum(), x)
    ref_g, = torch.autograd.grad(ref_out.sum(), x)
    torch.testing.assert_close(g, ref_g, atol=2e-5, rtol=2e-5)
    # With weights the module stays on fusedattn's kernels and still matches torch.
    out_w, w = ours(x, x, x, key_padding_mask=mask)
    ref_w = ref(x, x, x, key_padding_mask=mask)[1]
    torch.testing.assert_close(w, ref_w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kpm_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_kv_cache_decoding(torch_route, monkeypatch, kpm_kind, causal):
    op = torch.ops.fusedattn.kv_cache_attention
    B, H, Hk, T, E, Ev, C = 3, 4, 2, 3, 8, 6, 20
    kc, vc = torch.randn(B, Hk, C, E), torch.randn(B, Hk, C, Ev)
    q, k, v = torch.randn(B, H, T, E), torch.randn(B, Hk, T, E), torch.randn(B, Hk, T, Ev)
    kpm = None
    if kpm_kind is not None:
        kpm = torch.rand(B, 12) < 0.3
        kpm[:, 0] = False
        if kpm_kind == "float":
            kpm = torch.where(kpm, -math.inf, 0.5)
    n = torch.tensor([0, 5, 14])
    kw = dict(is_causal=causal, key_padding_mask=kpm, enable_gqa=True)
    state = (kc.clone(), vc.clone(), n.clone())
    # Inside a custom op's kernel a dispatch mode sees nothing; the profiler sees every op.
    with torch.profiler.profile() as prof:
        out, _, _ = op(q, k, v, kc, vc, n, **kw)
    assert any(e.name == "aten::scaled_dot_product_attention" for e in prof.events())
    ref, _, _ = own(monkeypatch, lambda: op(q, k, v, *state, **kw))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(n, state[2]) and torch.equal(kc, state[0]) and torch.equal(vc, state[1])
    # Queries against an empty cache without new keys see nothing: 0.
    empty = op(q, None, None, kc, vc, torch.zeros(B, dtype=torch.long), enable_gqa=True)[0]
    assert (empty == 0).all()


def test_module_decoding(torch_route):
    m = fusedattn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        full = m(x, x, x, is_causal=True, need_weights=False)[0]
        cache = m.kv_cache(2, 16)
        inc = torch.cat([m(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache,
                           is_causal=True, need_weights=False)[0] for t in range(9)], 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_varlen(torch_route, monkeypatch, alignment):
    lq, lk = [5, 0, 9, 3], [7, 4, 9, 0]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lq), 4, 8, requires_grad=True)
    k = torch.randn(sum(lk), 2, 8, requires_grad=True)
    v = torch.randn(sum(lk), 2, 5, requires_grad=True)

    def run():
        out = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, 9, 9, is_causal=True,
                                         causal_alignment=alignment, enable_gqa=True)
        return (out, *torch.autograd.grad((out * torch.linspace(-1, 1, 5)).sum(), (q, k, v)))

    with SdpaCalls() as calls:
        got = run()
    assert calls.ran
    for a, b in zip(got, own(monkeypatch, run)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_compiles_fullgraph(torch_route):
    q = torch.randn(2, 4, 6, 8)
    kpm = torch.rand(2, 6) < 0.3
    kpm[:, 0] = False

    def f(q):
        return fusedattn.attention(q, q, q, key_padding_mask=kpm, is_causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q), f(q))

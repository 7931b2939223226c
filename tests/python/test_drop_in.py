"""fusedattn.MultiheadAttention where code written for torch.nn.MultiheadAttention meets it:
the attributes torch's own code reads, torch's Transformer layers (eager, scripted, nested),
torch.jit.script, and the arguments torch accepts that a stricter module would refuse."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedattn


def pair(E, H, **kw):
    ours = fusedattn.MultiheadAttention(E, H, **kw).double()
    theirs = nn.MultiheadAttention(E, H, **kw).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("kw, packed", [({}, True), ({"kdim": 5, "vdim": 7}, False),
                                        ({"kdim": 12}, True), ({"head_dim": 5}, False)])
def test_qkv_same_embed_dim_is_torchs(kw, packed):
    m = fusedattn.MultiheadAttention(12, 3, **kw)
    assert m._qkv_same_embed_dim is packed
    if "head_dim" not in kw:
        assert nn.MultiheadAttention(12, 3, **{k: v for k, v in kw.items()})._qkv_same_embed_dim is packed
    assert (m.in_proj_weight is not None) == ("vdim" not in kw)


@pytest.mark.parametrize("kw", [{}, {"kdim": 5, "vdim": 7}])
def test_weights_picked_by_the_flag_drive_torchs_functional(kw):
    # What torch's own tests and user code do: read the flag, hand the weights to
    # F.multi_head_attention_forward, expect the module's result.
    torch.manual_seed(0)
    m = fusedattn.MultiheadAttention(12, 3, **kw).double()
    q = torch.randn(4, 2, 12, dtype=torch.float64)
    k = torch.randn(6, 2, kw.get("kdim", 12), dtype=torch.float64)
    v = torch.randn(6, 2, kw.get("vdim", 12), dtype=torch.float64)
    if m._qkv_same_embed_dim:
        extra = dict(in_proj_weight=m.in_proj_weight)
    else:
        extra = dict(in_proj_weight=None, use_separate_proj_weight=True,
                     q_proj_weight=m.q_proj_weight, k_proj_weight=m.k_proj_weight,
                     v_proj_weight=m.v_proj_weight)
    ref, ref_w = F.multi_head_attention_forward(
        q, k, v, 12, 3, in_proj_bias=m.in_proj_bias, bias_k=None, bias_v=None,
        add_zero_attn=False, dropout_p=0.0, out_proj_weight=m.out_proj.weight,
        out_proj_bias=m.out_proj.bias, **extra)
    out, w = m(q, k, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w)


def _encoder(E, H, ours, **kw):
    layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True).double()
    ref = copy.deepcopy(layer)
    if ours:
        mine = fusedattn.MultiheadAttention(E, H, batch_first=True).double()
        mine.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = mine
    return layer, ref


def _no_torch_fast_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("torch's fused encoder layer ran instead of fusedattn")
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fail)


def test_encoder_stack_in_eval_runs_it_on_nested_batches(monkeypatch):
    # With the truthful flag, TransformerEncoder packs a padded batch into a nested tensor in
    # eval without grad; each layer must still call this module (on that nested batch) and
    # give torch's result on the real tokens.
    torch.manual_seed(0)
    E, H = 16, 4
    layer, ref_layer = _encoder(E, H, ours=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "use_nested_tensor is False because ..." warning
        stack = nn.TransformerEncoder(layer, 2).eval()
    ref = nn.TransformerEncoder(ref_layer, 2, enable_nested_tensor=False).eval()
    assert stack.use_nested_tensor
    calls = []
    for lay in stack.layers:
        lay.self_attn.register_forward_hook(lambda mod, args, out: calls.append(args[0].is_nested))
    x = torch.randn(3, 9, E, dtype=torch.float64)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 2:] = True
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=pad)
        _no_torch_fast_path(monkeypatch)
        out = stack(x, src_key_padding_mask=pad)
    assert calls == [True, True]
    keep = ~pad
    torch.testing.assert_close(out[keep], expected[keep])
    assert (out[pad] == 0).all()


@pytest.mark.parametrize("hook_ours", [True, False])
def test_layer_with_user_hooks_still_calls_it(hook_ours, monkeypatch):
    torch.manual_seed(0)
    layer, ref = _encoder(12, 4, ours=True)
    layer.eval(), ref.eval()
    seen = []
    target = layer.self_attn if hook_ours else layer.linear1
    handle = target.register_forward_hook(lambda mod, args, out: seen.append(1))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.inference_mode():
        expected = ref(x)
        _no_torch_fast_path(monkeypatch)
        torch.testing.assert_close(layer(x), expected)
    assert seen == [1]
    handle.remove()
    assert len(layer.self_attn._forward_pre_hooks) == 1  # its own, which does nothing


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
@pytest.mark.parametrize("cross", [False, True])
def test_nested_inputs_equal_a_padded_batch(layout, cross):
    torch.manual_seed(0)
    E, H = 10, 5
    m = fusedattn.MultiheadAttention(E, H, batch_first=True).double()
    q_lens, k_lens = [4, 6, 1], ([7, 2, 5] if cross else [4, 6, 1])
    qs = [torch.randn(n, E, dtype=torch.float64) for n in q_lens]
    ks = [torch.randn(n, E, dtype=torch.float64) for n in k_lens] if cross else qs
    nq = torch.nested.nested_tensor(qs, layout=layout)
    nk = torch.nested.nested_tensor(ks, layout=layout) if cross else nq
    out, w = m(nq, nk, nk)
    assert out.is_nested and out.layout == layout
    assert w.shape == (3, max(q_lens), max(k_lens))
    for i, (qi, ki) in enumerate(zip(qs, ks)):
        expected, expected_w = m(qi.unsqueeze(0), ki.unsqueeze(0), ki.unsqueeze(0))
        torch.testing.assert_close(out.unbind()[i], expected[0])
        torch.testing.assert_close(w[i, :q_lens[i], :k_lens[i]], expected_w[0])


def test_nested_jagged_gradients_flow():
    torch.manual_seed(0)
    m = fusedattn.MultiheadAttention(8, 2, batch_first=True).double()
    parts = [torch.randn(n, 8, dtype=torch.float64, requires_grad=True) for n in (3, 5)]
    nt = torch.nested.as_nested_tensor(parts, layout=torch.jagged)
    out, _ = m(nt, nt, nt, need_weights=False)
    out.values().sum().backward()
    assert m.in_proj_weight.grad is not None and m.in_proj_weight.grad.abs().sum() > 0
    m.zero_grad()
    for p in parts:
        m(p.unsqueeze(0), p.unsqueeze(0), p.unsqueeze(0), need_weights=False)[0].sum().backward()
    dense_grad = m.in_proj_weight.grad.clone()
    m.zero_grad()
    out, _ = m(nt, nt, nt, need_weights=False)
    out.values().sum().backward()
    torch.testing.assert_close(m.in_proj_weight.grad, dense_grad)


@pytest.mark.parametrize("call, match", [
    (lambda m, nt: m(nt, nt, nt, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)),
     "key_padding_mask and attn_mask must be None"),
    (lambda m, nt: m(nt, torch.randn(2, 6, 8), torch.randn(2, 6, 8)), "must be nested too"),
    (lambda m, nt: m(torch.nested.nested_tensor([]), torch.nested.nested_tensor([]),
                     torch.nested.nested_tensor([])), "must be 3-D"),
])
def test_nested_misuse_is_named(call, match):
    m = fusedattn.MultiheadAttention(8, 2, batch_first=True)
    nt = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(6, 8)], layout=torch.jagged)
    with pytest.raises(ValueError, match=match):
        call(m, nt)
    seq_first = fusedattn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="batch_first=True"):
        seq_first(nt, nt, nt)


@pytest.mark.parametrize("kw", [{}, {"kdim": 6, "vdim": 5}, {"add_bias_kv": True},
                                {"add_zero_attn": True}, {"bias": False}, {"batch_first": True}])
def test_torch_jit_script_matches_eager_and_saves(kw):
    torch.manual_seed(0)
    m = fusedattn.MultiheadAttention(12, 3, **kw).double().eval()
    scripted = torch.jit.script(m)
    shape = (lambda n, f: (2, n, f)) if kw.get("batch_first") else (lambda n, f: (n, 2, f))
    q = torch.randn(shape(4, 12), dtype=torch.float64)
    k = torch.randn(shape(6, kw.get("kdim", 12)), dtype=torch.float64)
    v = torch.randn(shape(6, kw.get("vdim", 12)), dtype=torch.float64)
    kpm = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    for args in (dict(), dict(key_padding_mask=kpm, average_attn_weights=False),
                 dict(need_weights=False, is_causal=True)):
        expected = m(q, k, v, **args)
        got = scripted(q, k, v, **args)
        torch.testing.assert_close(got[0], expected[0])
        assert (got[1] is None) == (expected[1] is None)
        if expected[1] is not None:
            torch.testing.assert_close(got[1], expected[1])
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    torch.testing.assert_close(loaded(q, k, v)[0], m(q, k, v)[0])
    # The eager module keeps its pre-hook; the scripted copy went without.
    assert len(m._forward_pre_hooks) == 1


@pytest.mark.parametrize("train", [True, False])
def test_scripted_transformer_layers_match_eager(train):
    torch.manual_seed(0)
    layer, _ = _encoder(16, 4, ours=True)
    dec = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True).double()
    for attr in ("self_attn", "multihead_attn"):
        mine = fusedattn.MultiheadAttention(16, 4, batch_first=True).double()
        mine.load_state_dict(getattr(dec, attr).state_dict())
        setattr(dec, attr, mine)
    stack = nn.TransformerEncoder(layer, 2)
    for mod in (stack, dec):
        mod.train(train)
    src = torch.randn(2, 7, 16, dtype=torch.float64)
    tgt = torch.randn(2, 5, 16, dtype=torch.float64)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    s_stack, s_dec = torch.jit.script(stack), torch.jit.script(dec)
    with torch.set_grad_enabled(train):
        mem, s_mem = stack(src, src_key_padding_mask=pad), s_stack(src, src_key_padding_mask=pad)
        keep = ~pad
        torch.testing.assert_close(s_mem[keep], mem[keep])
        torch.testing.assert_close(
            s_dec(tgt, mem.detach(), tgt_mask=causal, tgt_is_causal=True),
            dec(tgt, mem.detach(), tgt_mask=causal, tgt_is_causal=True))


def test_bias_in_another_dtype_is_cast_as_torch_does():
    torch.manual_seed(0)
    ours, theirs = pair(8, 2, batch_first=True)
    for m in (ours, theirs):
        m.in_proj_bias = nn.Parameter(m.in_proj_bias.detach().half())
        m.eval()
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    out, _ = ours(q, q, q)
    assert out.dtype == torch.float64
    with torch.no_grad():  # torch's own fused path is the one that accepts it
        torch.testing.assert_close(out, theirs(q, q, q, need_weights=False)[0])
    # The output projection's bias too (torch refuses that one): cast to the weight's dtype.
    cast = copy.deepcopy(ours)
    ours.out_proj.bias = nn.Parameter(ours.out_proj.bias.detach().half())
    cast.out_proj.bias = nn.Parameter(ours.out_proj.bias.detach().double())
    torch.testing.assert_close(ours(q, q, q)[0], cast(q, q, q)[0])


class TestIsCausalWithMask:
    """torch treats is_causal=True as a hint that attn_mask is the causal mask."""

    def setup_method(self):
        torch.manual_seed(0)
        self.ours, self.theirs = pair(8, 2)
        self.x = torch.randn(5, 3, 8, dtype=torch.float64)

    def test_causal_mask_given_as_the_hint(self):
        x = self.x
        mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
        for kw in (dict(need_weights=False), dict(need_weights=True),
                   dict(key_padding_mask=torch.rand(3, 5) > 0.7)):
            if "key_padding_mask" in kw:
                kw["key_padding_mask"][:, 0] = False
            ours = self.ours(x, x, x, attn_mask=mask, is_causal=True, **kw)
            theirs = self.theirs(x, x, x, attn_mask=mask, is_causal=True, **kw)
            torch.testing.assert_close(ours[0], theirs[0])

    def test_mask_that_does_not_fit_is_set_aside_where_torch_ignores_it(self):
        x = self.x
        wrong = nn.Transformer.generate_square_subsequent_mask(2, dtype=torch.float64)
        with pytest.warns(UserWarning, match="attn_mask is ignored"):
            ours, _ = self.ours(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)
        theirs, _ = self.theirs(x, x, x, attn_mask=wrong, is_causal=True, need_weights=False)
        torch.testing.assert_close(ours, theirs)
        # Where torch does read the mask, a wrong shape is an error in both.
        with pytest.raises(RuntimeError, match="attn_mask must have shape"):
            self.ours(x, x, x, attn_mask=wrong, is_causal=True, need_weights=True)
        with pytest.raises(RuntimeError):
            self.theirs(x, x, x, attn_mask=wrong, is_causal=True, need_weights=True)

    def test_non_causal_mask_and_is_causal_both_apply(self):
        x = self.x
        allowed = torch.rand(5, 5) > 0.3
        allowed.fill_diagonal_(True)
        ours, _ = self.ours(x, x, x, attn_mask=~allowed, is_causal=True, need_weights=False)
        both = ~(allowed & torch.ones(5, 5, dtype=torch.bool).tril())
        expected, _ = self.ours(x, x, x, attn_mask=both, need_weights=False)
        torch.testing.assert_close(ours, expected)

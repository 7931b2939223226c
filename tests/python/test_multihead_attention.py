import copy
import io
import itertools

import pytest
import torch
import torch.nn as nn

import fusedattn

N, L, S, E, H = 3, 5, 7, 12, 3


def pair(dtype=torch.float64, **kw):
    """A fusedattn module and a torch module with the same parameters."""
    ours = fusedattn.MultiheadAttention(E, H, **kw).to(dtype)
    theirs = nn.MultiheadAttention(E, H, **kw).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def inputs(kdim=E, vdim=E, batch_first=False, dtype=torch.float64, self_attn=False):
    def shape(n, feats):
        return (N, n, feats) if batch_first else (n, N, feats)

    q = torch.randn(shape(L, E), dtype=dtype, requires_grad=True)
    if self_attn:
        return q, q, q
    k = torch.randn(shape(S, kdim), dtype=dtype, requires_grad=True)
    v = torch.randn(shape(S, vdim), dtype=dtype, requires_grad=True)
    return q, k, v


def masks(kind, dtype, seq=S):
    kpm_bool = torch.rand(N, seq) > 0.75
    kpm_bool[:, 0] = False  # no query loses every key: torch would give NaN there
    attn_bool = torch.rand(L, seq) > 0.75
    attn_bool[:, 0] = False
    return {
        "none": {},
        "kpm_bool": {"key_padding_mask": kpm_bool},
        "kpm_float": {"key_padding_mask": torch.randn(N, seq, dtype=dtype)},
        "attn_bool": {"attn_mask": attn_bool},
        "attn_float_3d": {"attn_mask": torch.randn(N * H, L, seq, dtype=dtype)},
        "both": {"attn_mask": attn_bool, "key_padding_mask": kpm_bool},
    }[kind]


OPTIONS = [
    {},
    {"bias": False},
    {"add_bias_kv": True},
    {"add_zero_attn": True},
    {"add_bias_kv": True, "add_zero_attn": True},
    {"kdim": 5, "vdim": 7},
    {"batch_first": True},
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "default")
@pytest.mark.parametrize("mask_kind", ["none", "kpm_bool", "kpm_float", "attn_bool",
                                       "attn_float_3d", "both"])
@pytest.mark.parametrize("average", [True, False])
def test_parity_with_torch(dtype, opts, mask_kind, average):
    ours, theirs = pair(dtype, **opts)
    q, k, v = inputs(opts.get("kdim", E), opts.get("vdim", E), opts.get("batch_first", False), dtype)
    kw = masks(mask_kind, dtype)
    out, w = ours(q, k, v, average_attn_weights=average, **kw)
    ref, ref_w = theirs(q, k, v, average_attn_weights=average, **kw)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(w, ref_w, **tol)
    g = torch.randn_like(out)
    params = [p for _, p in sorted(ours.named_parameters())]
    ref_params = [p for _, p in sorted(theirs.named_parameters())]
    grads = torch.autograd.grad(out, [q, k, v] + params, g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [q, k, v] + ref_params, g, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_packed_path_and_no_weights(batch_first):
    ours, theirs = pair(batch_first=batch_first)
    q, k, v = inputs(batch_first=batch_first, self_attn=True)
    out, w = ours(q, k, v, need_weights=False)
    assert w is None
    torch.testing.assert_close(out, theirs(q, k, v, need_weights=False)[0])


# Self-attention (one tensor passed as query, key and value) on the CPU runs the op
# `_attention_projected_forward` on the packed in-projection: q, k, v read in place from its
# output, the output written heads-merged, the gradient written into one (A, B, 3E) tensor.
# The "memory" form below (key is value) takes it with q and a packed k|v; three separate
# projections are test_parity_with_torch's cross-attention.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "kpm_bool", "kpm_float", "attn_bool",
                                       "attn_float_3d", "both"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("form", ["self", "memory"])  # (x, x, x); (x, mem, mem): packed k|v
def test_self_and_memory_attention_parity_with_torch(dtype, batch_first, mask_kind, need_weights,
                                                     average, form):
    ours, theirs = pair(dtype, batch_first=batch_first)
    x, mem, _ = inputs(batch_first=batch_first, dtype=dtype, self_attn=form == "self")
    seq = L if form == "self" else S
    kw = dict(masks(mask_kind, dtype, seq=seq), need_weights=need_weights,
              average_attn_weights=average)
    out, w = ours(x, mem, mem, **kw)
    ref, ref_w = theirs(x, mem, mem, **kw)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    if need_weights:
        torch.testing.assert_close(w, ref_w, **tol)
    # The weights' gradient too where they are returned (the op's reference backward).
    params = [p for _, p in sorted(ours.named_parameters())]
    ref_params = [p for _, p in sorted(theirs.named_parameters())]
    torch.manual_seed(3)
    g_out = torch.randn_like(out)
    g_w = None if w is None else torch.randn_like(w)
    loss = (out * g_out).sum() + (0 if w is None else (w * g_w).sum())
    ref_loss = (ref * g_out).sum() + (0 if w is None else (ref_w * g_w).sum())
    leaves = [x] if form == "self" else [x, mem]
    grads = torch.autograd.grad(loss, leaves + params)
    ref_grads = torch.autograd.grad(ref_loss, leaves + ref_params)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


def test_self_attention_float_mask_gradients():
    ours, theirs = pair()
    x, _, _ = inputs(self_attn=True)
    mask = torch.randn(N * H, L, L, dtype=torch.float64, requires_grad=True)
    kpm = torch.randn(N, L, dtype=torch.float64, requires_grad=True)
    out, _ = ours(x, x, x, attn_mask=mask, key_padding_mask=kpm)
    ref, _ = theirs(x, x, x, attn_mask=mask, key_padding_mask=kpm)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, mask, kpm], g),
                    torch.autograd.grad(ref, [x, mask, kpm], g)):
        torch.testing.assert_close(a, b)


def test_self_attention_gradcheck():
    m = fusedattn.MultiheadAttention(6, 2, batch_first=True).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    mask = torch.rand(5, 5) > 0.7  # True = masked (torch's convention)
    mask[:, 0] = False  # every query keeps a key
    torch.autograd.gradcheck(
        lambda x: m(x, x, x, key_padding_mask=kpm, attn_mask=mask, is_causal=False)[0], (x,))
    causal = torch.ones(5, 5).triu(1).bool()  # True = masked (torch's convention)
    torch.autograd.gradcheck(lambda x: m(x, x, x, is_causal=True, attn_mask=causal)[1], (x,))


def test_self_attention_dropout_repeats_under_a_seed_and_changes_without():
    m = fusedattn.MultiheadAttention(E, H, dropout=0.3, batch_first=True).train()
    x = torch.randn(N, L, E, requires_grad=True)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        out, _ = m(x, x, x)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        runs.append((out, g))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
    assert not torch.allclose(runs[0][0], runs[2][0])
    # The same mask with three separate projections (key and value passed as copies).
    torch.manual_seed(5)
    out_unpacked, _ = m(x, x.clone(), x.clone())
    torch.testing.assert_close(out_unpacked, runs[0][0])


def projected_samples():
    def rand(*shape, dtype=torch.float64, requires_grad=False):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)
    seed = torch.tensor([1234])
    # (query, key, value, num_heads, seq_first, attn_mask, key_padding_mask, dropout_seed,
    #  dropout_p, is_causal, return_weights, average_weights), (A, B, F) projections
    yield (rand(5, 2, 18, requires_grad=True), None, None, 3, True, None, None, None, 0.0, False,
           False, False)  # packed q|k|v
    yield (rand(2, 5, 24, requires_grad=True), None, None, 2, False, torch.rand(5, 5) > 0.3,
           torch.rand(2, 5) > 0.7, None, 0.0, True, True, True)
    yield (rand(3, 4, 4, dtype=torch.float32, requires_grad=True),
           rand(3, 6, 8, dtype=torch.float32, requires_grad=True), None, 2, False,
           rand(3, 2, 4, 6, dtype=torch.float32, requires_grad=True), None, seed, 0.25, False,
           True, False)  # q and packed k|v
    yield (rand(4, 3, 6, requires_grad=True), rand(7, 3, 6, requires_grad=True),
           rand(7, 3, 10, requires_grad=True), 2, True, None, rand(3, 7), None, 0.0, False,
           False, False)  # apart, Dv != D


@pytest.mark.parametrize("i", range(4))
def test_opcheck_internal_projected_forward(i):
    args = list(projected_samples())[i]
    torch.library.opcheck(torch.ops.fusedattn._attention_projected_forward.default, args)


def heads_of(x, h, seq_first):
    """(A, B, h * d) -> (N, h, seq, d), the attention op's layout."""
    x = x.unflatten(-1, (h, -1))
    return x.permute(1, 2, 0, 3) if seq_first else x.transpose(1, 2)


@pytest.mark.parametrize("seq_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.own_kernels
@pytest.mark.parametrize("form", ["qkv", "q_kv", "apart"])
def test_projected_op_equals_the_attention_op_on_views(seq_first, dtype, form):
    # Odd sizes; bf16 at 128+ queries per head takes the packed (AMX) backward.
    for n, seq, seq_k, h, d in ((3, 37, 37 if form == "qkv" else 29, 3, 8), (2, 130, 130, 2, 64)):
        def proj(length, parts):
            a, b = (length, n) if seq_first else (n, length)
            return torch.randn(a, b, parts * h * d, dtype=dtype, requires_grad=True)
        if form == "qkv":
            args = (proj(seq, 3), None, None)
            parts = args[0].chunk(3, -1)
        elif form == "q_kv":
            args = (proj(seq, 1), proj(seq_k, 2), None)
            parts = (args[0],) + args[1].chunk(2, -1)
        else:
            args = (proj(seq, 1), proj(seq_k, 1), proj(seq_k, 1))
            parts = args
        kpm = torch.rand(n, seq_k) > 0.8
        kpm[:, 0] = False
        out, _, _ = torch.ops.fusedattn._attention_projected_forward(
            *args, h, seq_first, None, kpm, None, 0.0, True, False, False)
        ref = fusedattn.attention(*(heads_of(p, h, seq_first) for p in parts),
                                  key_padding_mask=kpm, is_causal=True)
        ref = (ref.permute(2, 0, 1, 3) if seq_first else ref.transpose(1, 2)).flatten(-2)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        g = torch.randn_like(out)
        leaves = [a for a in args if a is not None]
        for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("n,length,mem_length", [(2, 0, 4), (2, 3, 0), (0, 3, 3), (2, 1, 1)])
def test_empty_and_single_sequences(batch_first, n, length, mem_length):
    ours, theirs = pair(batch_first=batch_first)
    def seq(l):
        return torch.randn((n, l, E) if batch_first else (l, n, E), dtype=torch.float64,
                           requires_grad=True)
    x, mem = seq(length), seq(mem_length)
    for args in ((x, x, x), (x, mem, mem)) if length == mem_length else ((x, mem, mem),):
        out, w = ours(*args)
        assert out.shape == args[0].shape and w.shape == (n, length, mem_length)
        grads = torch.autograd.grad(out.sum(), args[0])
        if mem_length == 0:  # no key: attention output 0, so out = out_proj's bias (torch: NaN)
            torch.testing.assert_close(out, ours.out_proj.bias.detach().expand_as(out))
            assert not grads[0].any()
        elif min(n, length) > 0:
            ref, ref_w = theirs(*args)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(w, ref_w)


@pytest.mark.parametrize("form", ["qkv", "q_kv", "apart"])
def test_projected_op_gradcheck_non_contiguous(form):
    # Projections whose feature dim is not the contiguous one (read through a copy), and a
    # key padding mask; fp64 gradcheck of the fused path (forward and backward kernels).
    h, d, n = 2, 3, 2
    def proj(length, parts):
        return torch.randn(parts * h * d, length, n, dtype=torch.float64).permute(1, 2, 0).requires_grad_()
    args = {"qkv": (proj(5, 3),), "q_kv": (proj(5, 1), proj(4, 2)),
            "apart": (proj(5, 1), proj(4, 1), proj(4, 1))}[form]
    kpm = torch.tensor([[False, False, False, True, True], [False] * 5])[:, : args[-1].shape[0]]
    def f(*a, weights):
        a = list(a) + [None] * (3 - len(a))
        out, _, w = torch.ops.fusedattn._attention_projected_forward(
            *a, h, True, None, kpm, None, 0.0, False, weights, False)
        return (out, w) if weights else out
    # out alone: the fused backward; with the weights: the reference backward (their gradient)
    torch.autograd.gradcheck(lambda *a: f(*a, weights=False), args)
    torch.autograd.gradcheck(lambda *a: f(*a, weights=True), args)


def test_projected_op_errors_name_the_argument():
    op = torch.ops.fusedattn._attention_projected_forward
    rest = (None, None, None, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="query must be 3-D"):
        op(torch.randn(2, 3), None, None, 1, False, *rest)
    with pytest.raises(RuntimeError, match="query's last dim must be a multiple of 3 \\* num_heads"):
        op(torch.randn(2, 3, 10), None, None, 2, False, *rest)
    with pytest.raises(RuntimeError, match="key's last dim must be a multiple of 2 \\* num_heads"):
        op(torch.randn(2, 3, 4), torch.randn(2, 3, 6), None, 2, False, *rest)
    with pytest.raises(RuntimeError, match="value without key"):
        op(torch.randn(2, 3, 4), None, torch.randn(2, 3, 4), 2, False, *rest)


def test_unbatched_input():
    ours, theirs = pair()
    x = torch.randn(L, E, dtype=torch.float64)
    kpm = torch.tensor([False, True, False, False, False])
    mask = torch.randn(H, L, L, dtype=torch.float64)
    for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": mask}):
        out, w = ours(x, x, x, **kw, average_attn_weights=False)
        ref, ref_w = theirs(x, x, x, **kw, average_attn_weights=False)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(w, ref_w)


def test_is_causal_alone_and_with_attn_mask():
    ours, theirs = pair()
    x = torch.randn(L, N, E, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    ref = theirs(x, x, x, attn_mask=causal)[0]
    torch.testing.assert_close(ours(x, x, x, is_causal=True)[0], ref)
    torch.testing.assert_close(ours(x, x, x, attn_mask=causal, is_causal=True)[0], ref)
    # With extra key columns the causal rule covers the real keys only, as torch's mask does.
    ours, theirs = pair(add_bias_kv=True, add_zero_attn=True)
    torch.testing.assert_close(ours(x, x, x, is_causal=True)[0],
                               theirs(x, x, x, attn_mask=causal)[0])


def test_same_initialisation_as_torch_under_a_seed():
    for kw in ({}, {"kdim": 5, "vdim": 7, "add_bias_kv": True}, {"bias": False}):
        torch.manual_seed(11)
        ours = fusedattn.MultiheadAttention(E, H, **kw)
        torch.manual_seed(11)
        theirs = nn.MultiheadAttention(E, H, **kw)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        for (n, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), n


def test_head_dim_beyond_torch():
    m = fusedattn.MultiheadAttention(10, 3, head_dim=4)
    assert m.in_proj_weight.shape == (36, 10) and m.out_proj.weight.shape == (10, 12)
    x = torch.randn(4, 2, 10)
    out, w = m(x, x, x)
    assert out.shape == (4, 2, 10) and w.shape == (2, 4, 4)
    # same numbers as the formula, written out
    qkv = x @ m.in_proj_weight.T + m.in_proj_bias
    q, k, v = (t.reshape(4, 2, 3, 4).permute(1, 2, 0, 3) for t in qkv.chunk(3, -1))
    p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1)
    ref = (p @ v).permute(2, 0, 1, 3).reshape(4, 2, 12) @ m.out_proj.weight.T + m.out_proj.bias
    torch.testing.assert_close(out, ref)


def test_is_a_torch_module_in_a_parent():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = fusedattn.MultiheadAttention(E, H)
            self.head = nn.Linear(E, 2)

    m = Model()
    assert isinstance(m.attn, nn.Module)
    names = [n for n, _ in m.named_parameters()]
    assert names[:4] == ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                         "attn.out_proj.bias"]
    assert set(m.state_dict()) == set(names)


def test_state_dict_both_ways_deepcopy_pickle():
    ours, theirs = pair(add_bias_kv=True)
    theirs2 = nn.MultiheadAttention(E, H, add_bias_kv=True).double()
    theirs2.load_state_dict(ours.state_dict())
    x = torch.randn(L, N, E, dtype=torch.float64)
    torch.testing.assert_close(theirs2(x, x, x)[0], ours(x, x, x)[0])
    clone = copy.deepcopy(ours)
    torch.testing.assert_close(clone(x, x, x)[0], ours(x, x, x)[0])
    with torch.no_grad():
        clone.in_proj_weight.zero_()
    assert ours.in_proj_weight.abs().sum() > 0
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x, x, x)[0], ours(x, x, x)[0])


def test_to_half_train_eval():
    m = fusedattn.MultiheadAttention(E, H, dropout=0.5)
    m.half()
    assert m.in_proj_weight.dtype == torch.float16 and m.out_proj.weight.dtype == torch.float16
    x = torch.randn(L, N, E, dtype=torch.float16)
    m.eval()
    a, b = m(x, x, x)[0], m(x, x, x)[0]
    assert torch.equal(a, b)
    m.train()
    assert not torch.equal(m(x, x, x)[0], a)
    m.to(torch.float64)
    assert m.in_proj_weight.dtype == torch.float64
    m2 = fusedattn.MultiheadAttention(E, H, dtype=torch.float64, device="cpu")
    assert m2.out_proj.bias.dtype == torch.float64


def test_the_cpp_module_and_the_python_module_agree():
    cpp = fusedattn._C.cpp.MultiheadAttention(E, H, add_zero_attn=True, kdim=5, vdim=7)
    py = fusedattn.MultiheadAttention(E, H, add_zero_attn=True, kdim=5, vdim=7)
    py.load_state_dict(dict(cpp.named_parameters(True)))
    q, k, v = inputs(5, 7, dtype=torch.float32)
    kpm = torch.rand(N, S) > 0.7
    torch.testing.assert_close(cpp.forward(q, k, v, key_padding_mask=kpm)[0],
                               py(q, k, v, key_padding_mask=kpm)[0])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_in_transformer_layers(train, batch_first):
    torch.manual_seed(0)
    d, h = 16, 4
    enc = nn.TransformerEncoderLayer(d, h, 32, dropout=0.0, batch_first=batch_first).double()
    dec = nn.TransformerDecoderLayer(d, h, 32, dropout=0.0, batch_first=batch_first).double()
    ref_enc, ref_dec = copy.deepcopy(enc), copy.deepcopy(dec)
    for layer, attr in ((enc, "self_attn"), (dec, "self_attn"), (dec, "multihead_attn")):
        mine = fusedattn.MultiheadAttention(d, h, batch_first=batch_first).double()
        mine.load_state_dict(getattr(layer, attr).state_dict())
        setattr(layer, attr, mine)
    for m in (enc, dec, ref_enc, ref_dec):
        m.train(train)
    src = torch.randn((2, 6, d) if batch_first else (6, 2, d), dtype=torch.float64)
    tgt = torch.randn((2, 5, d) if batch_first else (5, 2, d), dtype=torch.float64)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    memory = enc(src, src_key_padding_mask=pad)
    torch.testing.assert_close(memory, ref_enc(src, src_key_padding_mask=pad))
    out = dec(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
    ref = ref_dec(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
    torch.testing.assert_close(out, ref)
    # TransformerEncoder clones the layer with deepcopy
    stack = nn.TransformerEncoder(enc, 2, enable_nested_tensor=False)
    assert isinstance(stack.layers[1].self_attn, fusedattn.MultiheadAttention)
    stack(src, src_key_padding_mask=pad).sum().backward()
    assert stack.layers[0].self_attn.in_proj_weight.grad is not None


def test_transformer_encoder_layer_calls_it_in_eval_without_grad(monkeypatch):
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    ref = copy.deepcopy(layer)
    mine = fusedattn.MultiheadAttention(16, 4, batch_first=True)
    mine.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = mine
    src = torch.randn(2, 6, 16)
    with torch.no_grad():
        expected = ref(src)

    def torch_fast_path(*args, **kwargs):
        raise AssertionError("torch's fused encoder layer ran instead of fusedattn")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", torch_fast_path)
    with torch.no_grad():
        torch.testing.assert_close(layer(src), expected, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_of_a_model_with_it():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = fusedattn.MultiheadAttention(E, H, batch_first=True)
            self.out = nn.Linear(E, 1)

        def forward(self, x, kpm):
            y, w = self.attn(x, x, x, key_padding_mask=kpm)
            return self.out(y).squeeze(-1) + w.sum(-1)

    model = Model()
    compiled = torch.compile(model, fullgraph=True)
    for n_seq in (5, 8):  # the second length recompiles with dynamic shapes
        x = torch.randn(2, n_seq, E)
        kpm = torch.rand(2, n_seq) > 0.8
        kpm[:, 0] = False
        torch.testing.assert_close(compiled(x, kpm), model(x, kpm))
        compiled(x, kpm).sum().backward()


@pytest.mark.parametrize("form", ["self", "memory", "apart"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_compile_gradients_match_eager(form, batch_first):
    # The projected op's three forms (q|k|v; q and k|v; q, k, v) through AOTAutograd: the
    # fake kernels of its forward and backward give the shapes, the real ones the numbers.
    torch.manual_seed(0)
    m = fusedattn.MultiheadAttention(E, H, batch_first=batch_first, **(
        {"kdim": 5, "vdim": 7} if form == "apart" else {}))
    compiled = torch.compile(lambda *a, **kw: m(*a, **kw), fullgraph=True)
    x, k, v = inputs(5 if form == "apart" else E, 7 if form == "apart" else E,
                     batch_first=batch_first, dtype=torch.float32, self_attn=form == "self")
    args = (x, x, x) if form == "self" else (x, k, k) if form == "memory" else (x, k, v)
    kpm = torch.rand(N, args[1].shape[1 if batch_first else 0]) > 0.7
    kpm[:, 0] = False
    got, want = compiled(*args, key_padding_mask=kpm), m(*args, key_padding_mask=kpm)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    leaves = list({id(t): t for t in args}.values()) + list(m.parameters())
    g = torch.randn_like(want[0])
    for a, b in zip(torch.autograd.grad(got[0], leaves, g), torch.autograd.grad(want[0], leaves, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make,call,message", [
    (lambda: fusedattn.MultiheadAttention(10, 3), None, r"embed_dim \(10\) must be divisible by num_heads \(3\)"),
    (lambda: fusedattn.MultiheadAttention(8, 0), None, "num_heads must be positive"),
    (lambda: fusedattn.MultiheadAttention(8, 2, dropout=2.0), None, "dropout must be in"),
    (None, lambda m, x: m(x[..., :7], x, x), "embed_dim = 12"),
    (None, lambda m, x: m(x, x[:, :2], x[:, :2]), "same batch size"),
    (None, lambda m, x: m(x, x, x[:4]), "same sequence length"),
    (None, lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(N, 4, dtype=torch.bool)),
     r"key_padding_mask must have shape \(N, S\) = \(3, 5\)"),
    (None, lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 4, dtype=torch.bool)),
     r"attn_mask must have shape \(L, S\) = \(5, 5\)"),
    (None, lambda m, x: m(x, x, x, attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool)),
     r"attn_mask must have shape \(N \* num_heads, L, S\) = \(9, 5, 5\)"),
    (None, lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64)),
     "only bool and float attn_mask"),
    (None, lambda m, x: m(x[:, 0], x, x), "key and value must have as many dims as query"),
    (None, lambda m, x: m(x, x.double(), x.double()), "same dtype"),
])
def test_errors_name_the_argument(make, call, message):
    with pytest.raises(RuntimeError, match=message):
        if make is not None:
            make()
        else:
            call(fusedattn.MultiheadAttention(E, H), torch.randn(L, N, E))

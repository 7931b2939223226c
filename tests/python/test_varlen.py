"""attention_varlen: packed variable-length sequences against each sequence on its own (fp64
formula) and against the padded batch with key padding."""
import re

import pytest
import torch

import fusedattn
from test_variants import formula


def pack(lengths, heads, dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, heads, dim, generator=g, dtype=dtype) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return torch.cat(parts).requires_grad_(), cu


@pytest.mark.parametrize("causal,alignment", [(False, "top_left"), (True, "top_left"), (True, "bottom_right")])
@pytest.mark.parametrize("gqa", [False, True])
def test_each_sequence_is_its_own_attention(causal, alignment, gqa):
    lq = [5, 1, 0, 17, 9, 3]
    lk = [7, 4, 2, 17, 0, 11]
    H, Hk = 4, (2 if gqa else 4)
    q, cu_q = pack(lq, H, 8, seed=1)
    k, cu_k = pack(lk, Hk, 8, seed=2)
    v, _ = pack(lk, Hk, 6, seed=3)
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), is_causal=causal,
                                          causal_alignment=alignment, enable_gqa=gqa, return_lse=True)
    assert out.shape == (sum(lq), H, 6) and lse.shape == (H, sum(lq))
    g = torch.randn_like(out)
    out.backward(g)
    for b in range(len(lq)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb = (t.detach()[s].transpose(0, 1).requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
        ref, ref_lse = formula(qb, kb, vb, is_causal=causal, bottom_right=alignment == "bottom_right", gqa=gqa)
        torch.testing.assert_close(out[sq].transpose(0, 1), ref)
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[:, sq][finite], ref_lse[finite])
        assert torch.isneginf(lse[:, sq][~finite]).all()
        ref.backward(g[sq].transpose(0, 1))
        torch.testing.assert_close(q.grad[sq].transpose(0, 1), qb.grad)
        torch.testing.assert_close(k.grad[sk].transpose(0, 1), kb.grad)
        torch.testing.assert_close(v.grad[sk].transpose(0, 1), vb.grad)


def test_equals_the_padded_batch_with_key_padding():
    lengths = [3, 12, 7, 1]
    q, cu = pack(lengths, 2, 8, seed=4)
    k, _ = pack(lengths, 2, 8, seed=5)
    v, _ = pack(lengths, 2, 8, seed=6)
    out = fusedattn.attention_varlen(q, k, v, cu, cu, 12, 12)
    B, T = len(lengths), max(lengths)

    def padded(x):
        p = x.new_zeros(B, T, *x.shape[1:])
        for b, n in enumerate(lengths):
            p[b, :n] = x[cu[b]:cu[b + 1]]
        return p.transpose(1, 2)  # (B, H, T, E)
    pad = torch.arange(T)[None] >= torch.tensor(lengths)[:, None]
    ref = fusedattn.attention(padded(q), padded(k), padded(v), key_padding_mask=pad).transpose(1, 2)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], ref[b, :n])


def test_variants_per_sequence():
    lengths = [9, 14, 5]
    H = 3
    q, cu = pack(lengths, H, 8, seed=7)
    k, _ = pack(lengths, H, 8, seed=8)
    v, _ = pack(lengths, H, 8, seed=9)
    slopes = torch.rand(3, H)  # per sequence
    table = torch.randn(H, 7, dtype=torch.float64, requires_grad=True)
    kw = dict(window=(3, 1), softcap=4.0, rel_bias=table)
    out = fusedattn.attention_varlen(q, k, v, cu, cu, 14, 14, alibi_slopes=slopes, **kw)
    out.sum().backward()
    grad = table.grad.clone()
    table.grad = None
    total = 0
    for b in range(3):
        s = slice(cu[b], cu[b + 1])
        o = fusedattn.attention(*(t.detach()[s].transpose(0, 1) for t in (q, k, v)),
                                alibi_slopes=slopes[b], **kw)
        torch.testing.assert_close(out[s].transpose(0, 1), o)
        total = total + o.sum()
    total.backward()
    torch.testing.assert_close(grad, table.grad)


def test_dropout_and_float32():
    q, cu = pack([6, 10], 2, 16, dtype=torch.float32, seed=10)
    torch.manual_seed(3)
    a = fusedattn.attention_varlen(q, q, q, cu, cu, 10, 10, dropout_p=0.3)
    torch.manual_seed(3)
    b = fusedattn.attention_varlen(q, q, q, cu, cu, 10, 10, dropout_p=0.3)
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_no_sequences_and_all_empty():
    q = torch.randn(0, 2, 4)
    cu = torch.zeros(1, dtype=torch.int32)
    out, lse = fusedattn.attention_varlen(q, q, q, cu, cu, 0, 0, return_lse=True)
    assert out.shape == (0, 2, 4) and lse.shape == (2, 0)
    cu2 = torch.zeros(3, dtype=torch.int32)
    assert fusedattn.attention_varlen(q, q, q, cu2, cu2, 0, 0).shape == (0, 2, 4)


@pytest.mark.parametrize("cu_q,max_q,match", [
    (torch.tensor([0, 3, 2, 9], dtype=torch.int32), 9, "must be non-decreasing"),
    (torch.tensor([1, 3, 9], dtype=torch.int32), 9, "must start at 0 and end at the packed length 9"),
    (torch.tensor([0, 3, 8], dtype=torch.int32), 9, "must start at 0 and end at the packed length 9"),
    (torch.tensor([0, 3, 9], dtype=torch.int32), 4, "sequence 1 has length 6 > max_seqlen 4"),
    (torch.tensor([0.0, 3.0, 9.0]), 9, "must be a 1-D int32 tensor"),
    (torch.tensor([0, 9], dtype=torch.int32), 9, "the same number of sequences"),
])
def test_bad_offsets_are_named(cu_q, max_q, match):
    q = torch.randn(9, 2, 4)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=re.escape(match)):
        fusedattn.attention_varlen(q, q, q, cu_q, cu_k, max_q, 9)


# The fused CPU path (the sequences as tasks of one call) against the formula per sequence:
# lengths that cross the 64-query and 512/256-key blocks, empty sequences on either side, a
# length-1 sequence, every dtype, GQA, the variants, both alignments.
MIXED_Q = [70, 0, 1, 600, 33, 129, 5]
MIXED_K = [70, 3, 0, 600, 40, 129, 517]


def reference_per_sequence(q, k, v, lq, lk, grad, **kw):
    """fp64 formula per sequence -> (out, lse, dq, dk, dv, d_table)."""
    table = kw.pop("rel_bias", None)
    slopes = kw.pop("alibi", None)
    table64 = table.detach().double().requires_grad_() if table is not None else None
    outs, lses, dqs, dks, dvs = [], [], [], [], []
    cq = [0] + torch.tensor(lq).cumsum(0).tolist()
    ck = [0] + torch.tensor(lk).cumsum(0).tolist()
    for b in range(len(lq)):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        qb, kb, vb = (t.detach()[s].transpose(0, 1).double().requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
        a = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes)
        if table64 is not None:
            from test_variants import formula_rel
            ref, ref_lse = formula_rel(qb, kb, vb, table64, alibi=a, **kw)
        else:
            ref, ref_lse = formula(qb, kb, vb, alibi=a, **kw)
        ref.backward(grad[sq].transpose(0, 1).double())
        outs.append(ref.transpose(0, 1)), lses.append(ref_lse)
        dqs.append(qb.grad.transpose(0, 1)), dks.append(kb.grad.transpose(0, 1)), dvs.append(vb.grad.transpose(0, 1))
    return (torch.cat(outs), torch.cat(lses, 1), torch.cat(dqs), torch.cat(dks), torch.cat(dvs),
            None if table64 is None else table64.grad)


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(), dict(is_causal=True, bottom_right=True)],
                         ids=["causal", "full", "causal-bottom-right"])
def test_fused_mixed_lengths_against_the_formula(dtype, kw):
    H, Hk, E, Ev = 4, 2, 24, 13
    q, cu_q = pack(MIXED_Q, H, E, dtype=dtype, seed=11)
    k, cu_k = pack(MIXED_K, Hk, E, dtype=dtype, seed=12)
    v, _ = pack(MIXED_K, Hk, Ev, dtype=dtype, seed=13)
    align = "bottom_right" if kw.get("bottom_right") else "top_left"
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, max(MIXED_Q), max(MIXED_K), enable_gqa=True,
                                          is_causal=kw.get("is_causal", False), causal_alignment=align,
                                          return_lse=True)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    out.backward(g)
    ro, rl, rdq, rdk, rdv, _ = reference_per_sequence(q, k, v, MIXED_Q, MIXED_K, g, gqa=True, **kw)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ro, atol=tol, rtol=tol)
    finite = torch.isfinite(rl)
    torch.testing.assert_close(lse.double()[finite], rl[finite], atol=tol, rtol=tol)
    assert torch.isneginf(lse[~finite]).all()
    gtol = tol * (4 if dtype in (torch.bfloat16, torch.float16) else 10)
    for got, ref in ((q.grad, rdq), (k.grad, rdk), (v.grad, rdv)):
        torch.testing.assert_close(got.double(), ref, atol=gtol, rtol=gtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_variants_and_lse_gradient(dtype):
    H, E = 3, 16
    lq = [300, 7, 1, 90]
    q, cu = pack(lq, H, E, dtype=dtype, seed=14)
    k, _ = pack(lq, H, E, dtype=dtype, seed=15)
    v, _ = pack(lq, H, E, dtype=dtype, seed=16)
    slopes = torch.rand(len(lq), H)
    table = torch.randn(H, 2 * 5 + 1, dtype=dtype, requires_grad=True)
    kw = dict(window=(40, 2), softcap=5.0)
    out, lse = fusedattn.attention_varlen(q, k, v, cu, cu, 300, 300, alibi_slopes=slopes, rel_bias=table,
                                          return_lse=True, **kw)
    g = torch.randn_like(out)
    gl = torch.randn_like(lse)
    (out * g).sum().backward(retain_graph=True)
    ro, rl, rdq, rdk, rdv, rdt = reference_per_sequence(q, k, v, lq, lq, g, alibi=slopes, rel_bias=table, **kw)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ro, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), rl, atol=tol, rtol=tol)
    for got, ref in ((q.grad, rdq), (k.grad, rdk), (v.grad, rdv), (table.grad, rdt)):
        torch.testing.assert_close(got.double(), ref, atol=10 * tol, rtol=10 * tol)
    # lse's own gradient: the fused backward against the per-sequence calls' autograd.
    for t in (q, k, v, table):
        t.grad = None
    (lse * gl).sum().backward()
    fused = [t.grad.clone() for t in (q, k, v, table)]
    for t in (q, k, v, table):
        t.grad = None
    total = 0
    for b in range(len(lq)):
        s = slice(cu[b], cu[b + 1])
        _, _, lb = torch.ops.fusedattn.attention(*(t[s].transpose(0, 1) for t in (q, k, v)), alibi_slopes=slopes[b],
                                                 rel_bias=table, return_lse=True, **kw)
        total = total + (lb * gl[:, s]).sum()
    total.backward()
    for got, t in zip(fused, (q, k, v, table)):
        torch.testing.assert_close(got, t.grad, atol=10 * tol, rtol=10 * tol)


def test_fused_equals_the_reference_loop_with_dropout(monkeypatch):
    """The fused call and the per-sequence loop (FUSEDATTN_CPU_KERNEL=reference) draw the same
    dropout mask from one seed: each sequence its own range of the stream."""
    lq = [40, 3, 600, 17]
    q, cu = pack(lq, 2, 16, dtype=torch.float64, seed=17)

    def run():
        torch.manual_seed(7)
        out = fusedattn.attention_varlen(q, q, q, cu, cu, 600, 600, dropout_p=0.25, is_causal=True)
        (grad,) = torch.autograd.grad(out, q, torch.ones_like(out))
        return out, grad
    fused = run()
    monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "reference")
    loop = run()
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b)
    # Not one mask repeated: two sequences of equal length draw differently.
    q2, cu2 = pack([30, 30], 1, 8, dtype=torch.float64, seed=18)
    v2 = torch.ones(60, 1, 8, dtype=torch.float64)
    o = fusedattn.attention_varlen(q2, q2, v2, cu2, cu2, 30, 30, dropout_p=0.5)
    assert not torch.equal(o[:30], o[30:])


def test_one_thread_and_two_agree():
    q, cu = pack(MIXED_Q, 2, 8, dtype=torch.float32, seed=19)
    k, cu_k = pack(MIXED_K, 2, 8, dtype=torch.float32, seed=20)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            out = fusedattn.attention_varlen(q, k, k, cu, cu_k, 600, 600, is_causal=True)
            (gq,) = torch.autograd.grad(out.sum(), q)
            outs.append((out, gq))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_gradcheck_opcheck_and_compile():
    lq = [5, 0, 9, 1]
    q, cu = pack(lq, 2, 4, seed=21)
    k, _ = pack(lq, 2, 4, seed=22)
    v, _ = pack(lq, 2, 3, seed=23)
    table = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v, t: fusedattn.attention_varlen(q, k, v, cu, cu, 9, 9, is_causal=True, rel_bias=t,
                                                      window=(3, -1))
    assert torch.autograd.gradcheck(f, (q, k, v, table))
    args = (q.detach(), k.detach(), v.detach(), cu, cu, 9, 9, None, 0.0, True, False, None, False, [3, -1],
            None, None, table.detach())
    torch.library.opcheck(torch.ops.fusedattn._attention_varlen_forward, args)
    compiled = torch.compile(lambda q, k, v: fusedattn.attention_varlen(q, k, v, cu, cu, 9, 9, is_causal=True),
                             fullgraph=True)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = compiled(qf, kf, vf)
    torch.testing.assert_close(out, fusedattn.attention_varlen(qf, kf, vf, cu, cu, 9, 9, is_causal=True))
    out.sum().backward()
    assert qf.grad is not None and torch.isfinite(qf.grad).all()


# MultiheadAttention on packed sequences: forward(..., cu_seqlens=...) and jagged inputs.
def _torch_twin(m, **kw):
    ref = torch.nn.MultiheadAttention(m.embed_dim, m.num_heads, batch_first=True, **kw).double()
    ref.load_state_dict(m.state_dict())
    return ref


@pytest.mark.parametrize("is_causal", [False, True])
def test_module_packed_self_attention_equals_each_sequence_through_torch(is_causal):
    lengths = [7, 1, 0, 70, 12]
    E, H = 16, 4
    m = fusedattn.MultiheadAttention(E, H).double()
    ref = _torch_twin(m)
    x, cu = pack(lengths, 1, E, seed=24)
    x = x.detach().squeeze(1).requires_grad_()
    out, w = m(x, x, x, cu_seqlens=cu, need_weights=False, is_causal=is_causal)
    assert w is None and out.shape == (sum(lengths), E)
    g = torch.randn_like(out)
    out.backward(g)
    xr = x.detach().clone().requires_grad_()
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        s = slice(cu[b], cu[b + 1])
        xb = xr[s].unsqueeze(0)
        mask = torch.ones(n, n, dtype=torch.bool).triu(1) if is_causal else None
        o, _ = ref(xb, xb, xb, attn_mask=mask, need_weights=False)
        torch.testing.assert_close(out[s], o[0])
        o[0].backward(g[s])
    torch.testing.assert_close(x.grad, xr.grad)
    for (name, p), (_, pr) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, pr.grad, msg=name)


def test_module_packed_cross_attention_with_kdim_vdim():
    E, H, kdim, vdim = 12, 3, 5, 7
    m = fusedattn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim).double()
    ref = _torch_twin(m, kdim=kdim, vdim=vdim)
    lq, lk = [4, 9, 2], [6, 0, 11]
    q, cu_q = pack(lq, 1, E, seed=25)
    k, cu_k = pack(lk, 1, kdim, seed=26)
    v, _ = pack(lk, 1, vdim, seed=27)
    q, k, v = (t.detach().squeeze(1) for t in (q, k, v))
    out, _ = m(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k, need_weights=False)
    for b in range(3):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lk[b] == 0:  # no keys: 0 attention, the output projection's bias
            torch.testing.assert_close(out[sq], m.out_proj.bias.expand(lq[b], E))
            continue
        o, _ = ref(q[sq][None], k[sk][None], v[sk][None], need_weights=False)
        torch.testing.assert_close(out[sq], o[0])


def test_module_packed_variants_equal_each_sequence():
    E, H = 16, 4
    m = fusedattn.MultiheadAttention(E, H, window=(5, 0), alibi=True, max_relative_distance=3,
                                     softcap=20.0).double()
    with torch.no_grad():
        m.rel_bias.normal_()
    lengths = [20, 3, 33]
    x, cu = pack(lengths, 1, E, seed=28)
    x = x.detach().squeeze(1)
    out, _ = m(x, x, x, cu_seqlens=cu, max_seqlen=33, need_weights=False)
    for b in range(3):
        s = slice(cu[b], cu[b + 1])
        xb = x[s][:, None]  # (L, 1, E): sequence first
        o, _ = m(xb, xb, xb, need_weights=False)
        torch.testing.assert_close(out[s], o[:, 0])


def test_module_jagged_inputs_run_packed():
    E, H = 16, 4
    m = fusedattn.MultiheadAttention(E, H, batch_first=True).double()
    seqs = [torch.randn(n, E, dtype=torch.float64) for n in (3, 9, 1)]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    out, w = m(nt, nt, nt, need_weights=False, is_causal=True)
    assert w is None and out.is_nested and out.layout == torch.jagged
    for got, x in zip(out.unbind(), seqs):
        o, _ = m(x[None], x[None], x[None], need_weights=False, is_causal=True)
        torch.testing.assert_close(got, o[0])


def test_module_packed_compiles_and_scripts():
    E, H = 16, 4
    m = fusedattn.MultiheadAttention(E, H)
    x, cu = pack([5, 11, 2], 1, E, dtype=torch.float32, seed=29)
    x = x.detach().squeeze(1)
    ref, _ = m(x, x, x, cu_seqlens=cu, max_seqlen=11, need_weights=False, is_causal=True)
    f = torch.compile(lambda x: m(x, x, x, cu_seqlens=cu, max_seqlen=11, need_weights=False,
                                  is_causal=True)[0], fullgraph=True)
    torch.testing.assert_close(f(x), ref)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x, x, x, cu_seqlens=cu, max_seqlen=11, need_weights=False,
                                        is_causal=True)[0], ref)


@pytest.mark.parametrize("kw,match", [
    (dict(), "pass need_weights=False"),
    (dict(need_weights=False, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool)), "the offsets are the padding"),
    (dict(need_weights=False, attn_mask=torch.zeros(4, 4)), "the offsets are the padding"),
])
def test_module_packed_misuse_is_named(kw, match):
    m = fusedattn.MultiheadAttention(8, 2)
    x = torch.randn(4, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=re.escape(match)):
        m(x, x, x, cu_seqlens=cu, **kw)
    with pytest.raises(ValueError, match="add_bias_kv or add_zero_attn"):
        fusedattn.MultiheadAttention(8, 2, add_bias_kv=True)(x, x, x, cu_seqlens=cu, need_weights=False)
    with pytest.raises(RuntimeError, match=re.escape("must start at 0 and end at the packed length 4")):
        m(x, x, x, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), need_weights=False)
    with pytest.raises(RuntimeError, match="2-D query"):
        m(x[None], x[None], x[None], cu_seqlens=cu, need_weights=False)

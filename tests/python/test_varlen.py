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

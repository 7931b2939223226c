"""KV caches stored in fewer bytes than the model's dtype (bfloat16, float16, int8 with per-row
scales): the append's quantization against the formula written here, the decode against an
fp64 "quantize, dequantize, attend" formula (the arithmetic the kernel promises), the error
against the full-precision cache, and everything a cache does (modules, reorder, memories,
torch.compile, export, named misuse) with each storage."""
import math

import pytest
import torch

import fusedattn
from fusedattn import _C
from test_kv_cache import formula  # fp64 over the dequantized keys and values

op = torch.ops.fusedattn.kv_cache_attention
STORAGES = [torch.bfloat16, torch.float16, torch.int8]


def quantize(x, storage):
    """The storage's arithmetic, written out: int8 per row scale = max|x| / 127 in fp32,
    q = round-half-even(x / scale); a zero row scale 0, a row with a NaN or inf scale NaN."""
    if storage != torch.int8:
        return x.to(storage), None
    xf = x.float()
    amax = xf.abs().amax(-1)
    scale = amax / 127
    scale = torch.where(torch.isfinite(xf).all(-1), scale, torch.full_like(scale, math.nan))
    q = torch.where((scale > 0).unsqueeze(-1), torch.round(xf / scale.unsqueeze(-1)),
                    torch.zeros_like(xf))
    return q.clamp(-127, 127).to(torch.int8), scale


def dequantize(stored, scale):
    x = stored.double()
    return x if scale is None else x * scale.double().unsqueeze(-1)


def empty_cache(B, Hk, C, E, Ev, storage):
    kc = torch.zeros(B, Hk, C, E, dtype=storage)
    vc = torch.zeros(B, Hk, C, Ev, dtype=storage)
    ks = vs = None
    if storage == torch.int8:
        ks, vs = torch.zeros(B, Hk, C), torch.zeros(B, Hk, C)
    return kc, vc, ks, vs


@pytest.mark.parametrize("storage", STORAGES)
def test_quantize_for_cache_is_the_formula(storage):
    x = torch.randn(3, 2, 5, 37) * 3
    x[0, 0, 0] = 0  # a zero row
    x[1, 1, 2, 4] = math.nan
    x[2, 0, 3, 1] = math.inf
    got, scale = _C._quantize_for_cache(x, storage)
    want, want_scale = quantize(x, storage)
    assert got.dtype == storage and torch.equal(got.view(torch.uint8) if storage != torch.int8 else got,
                                                want.view(torch.uint8) if storage != torch.int8 else want)
    if storage == torch.int8:
        torch.testing.assert_close(scale, want_scale, equal_nan=True, atol=0, rtol=0)
        assert scale[0, 0, 0] == 0 and scale[1, 1, 2].isnan() and scale[2, 0, 3].isnan()
        back = dequantize(got, scale)
        assert back[1, 1, 2].isnan().all() and back[2, 0, 3].isnan().all()
        ok = scale.isfinite().unsqueeze(-1).expand_as(x)
        # Per row: the rounding error at most half a step.
        err = (back - x.double()).abs()[ok].view(-1)
        assert (err <= (scale.double().unsqueeze(-1).expand_as(x)[ok] / 2 + 1e-7)).all()
    else:
        assert scale is None


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("model", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Hk,T,E,Ev,C,prompt", [
    (3, 4, 4, 1, 16, 16, 40, [0, 7, 33]),     # an empty sequence, ragged
    (2, 6, 2, 3, 13, 7, 300, [100, 296]),     # GQA, odd head dims, across key blocks
    (1, 2, 1, 2, 40, 24, 1700, [1600]),       # long: split across threads
])
@pytest.mark.parametrize("causal,kpm_kind", [(False, None), (True, None), (True, "bool"),
                                             (False, "float")])
def test_append_and_attend_against_the_formula(storage, model, B, H, Hk, T, E, Ev, C, prompt,
                                               causal, kpm_kind):
    kc, vc, ks, vs = empty_cache(B, Hk, C, E, Ev, storage)
    lengths = torch.zeros(B, dtype=torch.long)
    # The prompts: one append per sequence length (ragged: each row appends up to its own).
    n_max = max(prompt)
    keys = torch.randn(B, Hk, n_max + T, E).to(model)
    values = torch.randn(B, Hk, n_max + T, Ev).to(model)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[model]
    if n_max:
        # Many query rows: the dequantized blocks on the GEMMs (the decode below: registers).
        q_pre = torch.randn(B, H, n_max, E).to(model)
        pre = op(q_pre, keys[:, :, :n_max], values[:, :, :n_max], kc, vc, lengths,
                 enable_gqa=H != Hk, key_scales=ks, value_scales=vs)[0]
        ref, _, _ = formula(q_pre, dequantize(kc, ks), dequantize(vc, vs), lengths, False)
        torch.testing.assert_close(pre.double(), ref, atol=tol, rtol=tol)
        lengths.copy_(torch.tensor(prompt))
    # The decode step: T new tokens at each sequence's own length.
    k_new, v_new = keys[:, :, n_max:], values[:, :, n_max:]
    q = torch.randn(B, H, T, E).to(model)
    kpm = None
    if kpm_kind is not None:
        K = min(C, n_max + T - 1)
        kpm = torch.rand(B, K) < 0.2
        if kpm_kind == "float":
            kpm = torch.where(kpm, -math.inf, torch.randn(B, K)).to(model)
    out, lse, _ = op(q, k_new, v_new, kc, vc, lengths, is_causal=causal, key_padding_mask=kpm,
                     enable_gqa=H != Hk, return_lse=True, key_scales=ks, value_scales=vs)
    assert lengths.tolist() == [n + T for n in prompt]
    for b, n in enumerate(prompt):  # the stored rows are the formula's, bit for bit
        for cache, scales, src in ((kc, ks, keys), (vc, vs, values)):
            rows = torch.cat([src[b, :, :n], src[b, :, n_max:]], 1)
            want, want_scale = quantize(rows, storage)
            got = cache[b, :, :n + T]
            if storage == torch.int8:
                assert torch.equal(got, want)
                torch.testing.assert_close(scales[b, :, :n + T], want_scale, atol=0, rtol=0)
            else:
                assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    ref, ref_lse, _ = formula(q, dequantize(kc, ks), dequantize(vc, vs), lengths, causal, kpm)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("storage", STORAGES)
def test_reference_and_kernel_agree(storage, monkeypatch):
    kc, vc, ks, vs = empty_cache(2, 2, 600, 24, 24, storage)
    lengths = torch.zeros(2, dtype=torch.long)
    args = (torch.randn(2, 2, 500, 24), torch.randn(2, 2, 500, 24), torch.randn(2, 2, 500, 24))
    op(*args, kc, vc, lengths, key_scales=ks, value_scales=vs)
    q, k, v = torch.randn(2, 2, 1, 24), torch.randn(2, 2, 1, 24), torch.randn(2, 2, 1, 24)
    copies = lambda: [t.clone() if t is not None else None for t in (kc, vc, lengths, ks, vs)]  # noqa: E731
    a_kc, a_vc, a_len, a_ks, a_vs = copies()
    a, a_lse, a_w = op(q, k, v, a_kc, a_vc, a_len, is_causal=True, key_scales=a_ks,
                       value_scales=a_vs, return_lse=True, return_weights=True)
    monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "reference")
    b_kc, b_vc, b_len, b_ks, b_vs = copies()
    b, b_lse, b_w = op(q, k, v, b_kc, b_vc, b_len, is_causal=True, key_scales=b_ks,
                       value_scales=b_vs, return_lse=True, return_weights=True)
    assert torch.equal(a_kc, b_kc) and torch.equal(a_vc, b_vc) and torch.equal(a_len, b_len)
    if storage == torch.int8:
        assert torch.equal(a_ks, b_ks) and torch.equal(a_vs, b_vs)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_lse, b_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_w, b_w, atol=1e-5, rtol=1e-5)


def mha(dtype=torch.float32, **kw):
    return fusedattn.MultiheadAttention(64, 4, dtype=dtype, batch_first=True, **kw).eval()


# The error of a decode against the full-precision cache's, relative to the output's norm,
# per token: bf16 storage rounds to 2^-9, fp16 to 2^-12, int8 to half of max|x| / 127 per row.
STORAGE_TOL = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.int8: 1e-2}


@pytest.mark.parametrize("storage", STORAGES)
def test_module_decoding_against_the_full_cache(storage):
    m = mha()
    N, L = 3, 40
    x = torch.randn(N, L, 64)
    with torch.no_grad():
        full, small = m.kv_cache(N, 64), m.kv_cache(N, 64, cache_dtype=storage)
        assert small.cache_dtype == storage and full.cache_dtype == torch.float32
        a = torch.cat([m(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=full, is_causal=True)[0]
                       for t in range(L)], 1)
        b = torch.cat([m(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=small, is_causal=True)[0]
                       for t in range(L)], 1)
    rel = ((b - a).norm(dim=-1) / a.norm(dim=-1)).max().item()
    assert rel < STORAGE_TOL[storage], rel
    assert small.lengths.tolist() == [L] * N
    assert small.key_cache.element_size() == {torch.int8: 1}.get(storage, 2)


@pytest.mark.parametrize("storage", STORAGES)
def test_memory_reorder_and_reset_with_each_storage(storage):
    m = mha()
    N, L = 3, 6
    x = torch.randn(N, L, 64)
    enc = torch.randn(N, 5, 64)
    kpm = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]]).bool()
    index = torch.tensor([2, 0, 0, 1])
    nxt = torch.randn(4, 1, 64)
    with torch.no_grad():
        memory = m.memory_cache(enc, kpm, cache_dtype=storage)
        assert memory.cache_dtype == storage
        got = m(nxt[:N], None, None, cache=memory)[0]
        want = m(nxt[:N], enc, enc, key_padding_mask=kpm)[0]
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < STORAGE_TOL[storage]
        memory.reorder(index)
        got = m(nxt, None, None, cache=memory)[0]
        want = m(nxt, enc[index], enc[index], key_padding_mask=kpm[index])[0]
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < STORAGE_TOL[storage]

        cache = m.kv_cache(5, L + 1, cache_dtype=storage)
        cache.reset(N)
        m(x, x, x, cache=cache, is_causal=True)
        reordered = m.kv_cache(5, L + 1, cache_dtype=storage)
        reordered.reset(4)
        m(x[index], x[index], x[index], cache=reordered, is_causal=True)
        cache.reorder(index)  # the same rows, scales included, as appending the reordered batch
        for name in ("key_cache", "value_cache") + (("key_scales", "value_scales")
                                                    if storage == torch.int8 else ()):
            assert torch.equal(getattr(cache, name)[:4], getattr(reordered, name)[:4]), name
        a = m(nxt, nxt, nxt, cache=cache, is_causal=True)[0]
        b = m(nxt, nxt, nxt, cache=reordered, is_causal=True)[0]
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        cache.reset()
        assert cache.batch == 5 and cache.lengths.tolist() == [0] * 5


@pytest.mark.parametrize("storage", STORAGES)
def test_nan_in_a_new_key_reaches_its_sequence_only(storage):
    kc, vc, ks, vs = empty_cache(2, 2, 50, 16, 16, storage)
    lengths = torch.zeros(2, dtype=torch.long)
    q, k, v = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16)
    k[0, 1, 2, 5] = math.nan
    out = op(q, k, v, kc, vc, lengths, key_scales=ks, value_scales=vs)[0]
    assert out[0, 1].isnan().all() and out[1].isfinite().all() and out[0, 0].isfinite().all()


@pytest.mark.parametrize("storage", STORAGES)
def test_export_captures_a_decode_step(storage):
    # torch.compile without recompiling: test_kv_cache.py, with each storage.
    class Step(torch.nn.Module):
        def forward(self, x, key_cache, value_cache, lengths, key_scales, value_scales):
            out, _, _ = op(x, x, x, key_cache, value_cache, lengths, is_causal=True,
                           key_scales=key_scales, value_scales=value_scales)
            return out

    c = fusedattn.KVCache(2, 16, 4, 8, cache_dtype=storage)
    scales = (c.key_scales, c.value_scales)
    ep = torch.export.export(Step(), (torch.randn(2, 4, 1, 8), c.key_cache, c.value_cache,
                                      c.lengths) + scales)
    y = torch.randn(2, 4, 5, 8)
    c2 = fusedattn.KVCache(2, 16, 4, 8, cache_dtype=storage)
    with torch.no_grad():
        got = torch.cat([ep.module()(y[:, :, t:t + 1], c.key_cache, c.value_cache, c.lengths,
                                     *scales) for t in range(5)], 2)
        want = torch.cat([c2.attend(y[:, :, t:t + 1], y[:, :, t:t + 1], y[:, :, t:t + 1],
                                    is_causal=True)[0] for t in range(5)], 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert c.lengths.tolist() == [5, 5]


@pytest.mark.parametrize("storage", [None, *STORAGES])
def test_append_alone_stores_what_the_attention_appends(storage):
    torch.manual_seed(6)
    B, Hk, T, E = 2, 2, 3, 8
    q, k, v = torch.randn(B, 2 * Hk, T, E), torch.randn(B, Hk, T, E), torch.randn(B, Hk, T, E)
    fused = fusedattn.KVCache(B, 8, Hk, E, cache_dtype=storage)
    split = fusedattn.KVCache(B, 8, Hk, E, cache_dtype=storage)
    want, _, _ = fused.attend(q, k, v, is_causal=True, enable_gqa=True)
    split.append(k, v)
    assert split.lengths.tolist() == [T, T]
    for name in split._row_tensors():
        assert torch.equal(getattr(split, name), getattr(fused, name)), name
    got, _, _ = split.attend(q, is_causal=True, enable_gqa=True)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="the cache is full"):
        fusedattn.KVCache(B, 2, Hk, E, cache_dtype=storage).append(k, v)
    memory = fusedattn.KVCache.from_tensors(k, v)
    with pytest.raises(ValueError, match="read-only"):
        memory.append(k, v)


def test_opcheck_with_scales():
    kc, vc, ks, vs = empty_cache(2, 2, 20, 8, 6, torch.int8)
    args = (torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 6), kc, vc,
            torch.tensor([4, 9]))
    torch.library.opcheck(op, args, dict(is_causal=True, return_lse=True, key_scales=ks,
                                         value_scales=vs),
                          test_utils=("test_schema", "test_faketensor"))


def test_misuse_is_named():
    q = torch.randn(2, 2, 1, 8)
    lengths = torch.zeros(2, dtype=torch.long)
    kc, vc, ks, vs = empty_cache(2, 2, 4, 8, 8, torch.int8)
    with pytest.raises(RuntimeError, match="int8 cache needs key_scales and value_scales"):
        op(q, q, q, kc, vc, lengths)
    with pytest.raises(RuntimeError, match="value_scales must be float"):
        op(q, q, q, kc, vc, lengths, key_scales=ks, value_scales=vs.double())
    with pytest.raises(RuntimeError, match=r"key_scales must have the cache's \(batch, Hk, max_len\)"):
        op(q, q, q, kc, vc, lengths, key_scales=ks[:, :, :3], value_scales=vs)
    bkc, bvc, _, _ = empty_cache(2, 2, 4, 8, 8, torch.bfloat16)
    with pytest.raises(RuntimeError, match="key_scales and value_scales belong to an int8 cache"):
        op(q, q, q, bkc, bvc, lengths, key_scales=ks, value_scales=vs)
    with pytest.raises(RuntimeError, match="key and value must have query's dtype"):
        op(q, q.bfloat16(), q.bfloat16(), bkc, bvc, lengths)
    with pytest.raises(RuntimeError, match="key_cache and value_cache must have one dtype"):
        op(q, q, q, bkc, vc, lengths)
    with pytest.raises(RuntimeError, match=r"cache must have query's dtype \(Double\), got Char"):
        op(q.double(), None, None, kc, vc, lengths, key_scales=ks, value_scales=vs)
    with pytest.raises(RuntimeError, match="bfloat16, float16 or int8"):
        op(q, None, None, kc.int(), vc.int(), lengths)
    assert lengths.tolist() == [0, 0]  # nothing was appended by a refused call
    with pytest.raises(ValueError, match="cache_dtype must be the model's dtype"):
        fusedattn.KVCache(1, 4, 2, 8, cache_dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_dtype must be the model's dtype"):
        fusedattn.KVCache(1, 4, 2, 8, dtype=torch.float64, cache_dtype=torch.int8)
    with pytest.raises(TypeError, match="cache_dtype must be a torch.dtype"):
        mha().kv_cache(1, 4, cache_dtype="int8")

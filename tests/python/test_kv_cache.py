"""Incremental decoding: the kv_cache_attention op (the CPU decode kernel at this tier, its
split across threads), fusedattn.KVCache, and MultiheadAttention's cache path, against an
fp64 formula written here and against the full causal forward."""
import math

import pytest
import torch

import fusedattn

op = torch.ops.fusedattn.kv_cache_attention


def formula(q, kc, vc, lengths, causal, kpm=None, scale=None):
    """fp64: each query against the cache's first lengths[b] positions (after the append);
    token t sees positions <= lengths[b] - T + t when causal. -> (out, lse, weights over max_len)."""
    B, H, T, E = q.shape
    Hk, C = kc.shape[1], kc.shape[2]
    k = kc[:B].double().repeat_interleave(H // Hk, 1)
    v = vc[:B].double().repeat_interleave(H // Hk, 1)
    s = q.double() @ k.transpose(-2, -1) * (E ** -0.5 if scale is None else scale)
    j = torch.arange(C).view(1, 1, 1, C)
    n = lengths.view(B, 1, 1, 1)
    hidden = j >= n
    if causal:
        hidden = hidden | (j > n - T + torch.arange(T).view(1, 1, T, 1))
    if kpm is not None:
        K = kpm.shape[1]
        full = torch.zeros(B, C, dtype=kpm.dtype)
        full[:, :K] = kpm
        if kpm.dtype == torch.bool:
            hidden = hidden | full.view(B, 1, 1, C)
        else:
            s = s + full.double().view(B, 1, 1, C)
    s = s.masked_fill(hidden, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(lse.isneginf(), 0).unsqueeze(-1))
    return p @ v, lse, p


def filled_cache(B, Hk, C, E, Ev, lengths, dtype, extra_rows=0):
    kc = torch.zeros(B + extra_rows, Hk, C, E, dtype=dtype)
    vc = torch.zeros(B + extra_rows, Hk, C, Ev, dtype=dtype)
    for b, n in enumerate(lengths):
        kc[b, :, :n] = torch.randn(Hk, n, E).to(dtype)
        vc[b, :, :n] = torch.randn(Hk, n, Ev).to(dtype)
    return kc, vc


TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Hk,T,E,Ev,C,lengths", [
    (3, 4, 4, 1, 16, 16, 40, [0, 7, 33]),      # an empty sequence, ragged
    (2, 6, 2, 3, 13, 7, 300, [100, 297]),      # GQA, odd head dims, across key blocks
    (1, 2, 1, 5, 32, 24, 1700, [1600]),        # long: split across threads
    (2, 8, 1, 16, 64, 64, 600, [513, 40]),     # MQA, 16 new tokens
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kpm_kind", [None, "bool", "float"])
def test_append_and_attend_against_fp64(dtype, B, H, Hk, T, E, Ev, C, lengths, causal, kpm_kind):
    before = torch.tensor(lengths)
    kc, vc = filled_cache(B, Hk, C, E, Ev, lengths, dtype, extra_rows=1)
    q = torch.randn(B, H, T, E).to(dtype)
    k, v = torch.randn(B, Hk, T, E).to(dtype), torch.randn(B, Hk, T, Ev).to(dtype)
    kpm = None
    if kpm_kind is not None:
        K = min(C, max(lengths) + T - 2)  # shorter than the cache: later positions not padding
        kpm = torch.rand(B, K) < 0.2
        if kpm_kind == "float":
            kpm = torch.where(kpm, -math.inf, torch.randn(B, K)).to(dtype)
    lengths_t = before.clone()
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse, w = op(q, k, v, kc, vc, lengths_t, is_causal=causal, key_padding_mask=kpm,
                     enable_gqa=H != Hk, return_lse=True, return_weights=True)
    assert torch.equal(lengths_t, before + T)
    for b, n in enumerate(lengths):  # appended in place, nothing else touched
        assert torch.equal(kc[b, :, n:n + T], k[b]) and torch.equal(vc[b, :, n:n + T], v[b])
        assert torch.equal(kc[b, :, :n], kc0[b, :, :n]) and torch.equal(kc[b, :, n + T:], kc0[b, :, n + T:])
    assert torch.equal(kc[B:], kc0[B:])
    ref, ref_lse, ref_w = formula(q, kc, vc, lengths_t, causal, kpm)
    seen = ref_lse > -math.inf
    assert torch.equal(lse > -math.inf, seen)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=tol * 4, rtol=tol)
    torch.testing.assert_close(w.double(), ref_w, atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_split_keys_merge_equals_one_task(threads):
    # The flash-decoding split depends on the thread count; each split gives the same numbers.
    B, H, C, E = 1, 2, 4096, 64
    kc, vc = filled_cache(B, H, C, E, E, [4000], torch.float32)
    q = torch.randn(B, H, 1, E)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse, _ = op(q, None, None, kc, vc, torch.tensor([4000]), return_lse=True)
    finally:
        torch.set_num_threads(old)
    ref, ref_lse, _ = formula(q, kc, vc, torch.tensor([4000]), False)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


def test_nan_reaches_only_its_sequence_and_masked_rows_are_zero():
    kc, vc = filled_cache(2, 1, 600, 8, 8, [550, 550], torch.float32)
    kc[0, 0, 520, 3] = float("nan")
    q = torch.randn(2, 1, 1, 8)
    old = torch.get_num_threads()
    torch.set_num_threads(8)  # split: the NaN sits in a later range than the first
    try:
        out, lse, _ = op(q, None, None, kc, vc, torch.tensor([550, 550]), return_lse=True)
    finally:
        torch.set_num_threads(old)
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert out[1].isfinite().all()
    # Every position padded: zeros, lse -inf, weights 0.
    kpm = torch.ones(2, 600, dtype=torch.bool)
    out, lse, w = op(q, None, None, kc, vc, torch.tensor([550, 550]), key_padding_mask=kpm,
                     return_lse=True, return_weights=True)
    assert torch.equal(out, torch.zeros_like(out)) and lse.isneginf().all()
    assert torch.equal(w, torch.zeros_like(w))


def test_reference_kernel_matches(monkeypatch):
    kc, vc = filled_cache(2, 2, 50, 8, 8, [10, 20], torch.float32)
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    a = op(q, k, v, kc.clone(), vc.clone(), torch.tensor([10, 20]), is_causal=True)[0]
    monkeypatch.setenv("FUSEDATTN_CPU_KERNEL", "reference")
    b = op(q, k, v, kc.clone(), vc.clone(), torch.tensor([10, 20]), is_causal=True)[0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- modules


def mha(dtype=torch.float32, **kw):
    return fusedattn.MultiheadAttention(48, 4, dtype=dtype, **kw).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("chunk", [1, 4])
def test_token_by_token_equals_full_causal_forward(dtype, tol, batch_first, chunk):
    m = mha(dtype, batch_first=batch_first)
    N, L = 3, 13
    x = torch.randn(N, L, 48, dtype=dtype)
    xs = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        full, wf = m(xs, xs, xs, is_causal=True)
        cache = m.kv_cache(N, 32)
        outs, ws = [], []
        for t in range(0, L, chunk):
            step = x[:, t:t + chunk] if batch_first else x[:, t:t + chunk].transpose(0, 1)
            o, w = m(step, step, step, cache=cache, is_causal=True)
            outs.append(o)
            ws.append(w)
    inc = torch.cat(outs, 1 if batch_first else 0)
    torch.testing.assert_close(inc, full, atol=tol, rtol=tol)
    torch.testing.assert_close(torch.cat(ws, 1)[..., :L], wf, atol=tol, rtol=tol)
    assert torch.equal(torch.cat(ws, 1)[..., L:], torch.zeros(N, L, 32 - L, dtype=dtype))
    assert cache.lengths.tolist() == [L] * N


def test_bf16_decoding_within_twice_torchs_error():
    # FlashAttention's rule: against fp64 on the same weights, at most twice the error of
    # torch's own bf16 module running the whole sequence at once.
    m32 = mha(batch_first=True)
    m = mha(torch.bfloat16, batch_first=True)
    m.load_state_dict(m32.state_dict())
    tm = torch.nn.MultiheadAttention(48, 4, dtype=torch.bfloat16, batch_first=True).eval()
    tm.load_state_dict(m32.state_dict())
    N, L = 2, 40
    x = torch.randn(N, L, 48).bfloat16()
    with torch.no_grad():
        xd = x.double()
        ref = m32.double()(xd, xd, xd, is_causal=True)[0]
        cache = m.kv_cache(N, L)
        inc = torch.cat([m(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache,
                           is_causal=True, need_weights=False)[0] for t in range(L)], 1)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.bfloat16)
        theirs = tm(x, x, x, attn_mask=mask, need_weights=False)[0]
    ours_err = (inc.double() - ref).abs().max()
    their_err = (theirs.double() - ref).abs().max()
    assert ours_err <= 2 * their_err + 1e-4, (ours_err, their_err)


def test_unbatched_and_separate_kv_dims():
    m = fusedattn.MultiheadAttention(32, 4, kdim=32, vdim=32, bias=False).eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        full = m(x, x, x, is_causal=True)[0]
        cache = m.kv_cache(1, 9)
        inc = torch.cat([m(x[t:t + 1], x[t:t + 1], x[t:t + 1], cache=cache, is_causal=True)[0]
                         for t in range(9)], 0)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="cache is full"):
        with torch.no_grad():
            m(x[:1], x[:1], x[:1], cache=cache, is_causal=True)
    m2 = fusedattn.MultiheadAttention(32, 4, kdim=20, vdim=12).eval()
    enc = torch.randn(1, 7, 20)
    with torch.no_grad():
        y = torch.randn(5, 1, 32)
        a = m2(y, enc.transpose(0, 1), torch.randn(7, 1, 12), need_weights=False)[0]
    assert a.shape == (5, 1, 32)


@pytest.mark.parametrize("batch_first", [True, False])
def test_memory_cache_equals_cross_attention(batch_first):
    m = mha(batch_first=batch_first)
    N, S, T = 3, 11, 6
    enc = torch.randn(N, S, 48) if batch_first else torch.randn(S, N, 48)
    y = torch.randn(N, T, 48) if batch_first else torch.randn(T, N, 48)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, 6:] = True
    kpm[2, :] = True  # a sequence with nothing to attend to
    with torch.no_grad():
        full, wf = m(y, enc, enc, key_padding_mask=kpm)
        memory = m.memory_cache(enc, kpm)
        inc, wi = m(y, None, None, cache=memory)
        # one token at a time, the memory read in place each step
        steps = [m(y[:, t:t + 1] if batch_first else y[t:t + 1], None, None, cache=memory,
                   need_weights=False)[0] for t in range(T)]
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wi, wf, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1 if batch_first else 0), full, atol=1e-5, rtol=1e-5)
    assert memory.lengths.tolist() == [S] * N


def test_ragged_prompts_then_decoding_equals_each_sequence_alone():
    m = mha(batch_first=True)
    lens = [3, 8, 5]
    N, P, steps = 3, max(lens), 4
    seqs = [torch.randn(n + steps, 48) for n in lens]
    prompt = torch.zeros(N, P, 48)
    pad = torch.ones(N, P, dtype=torch.bool)
    for b, n in enumerate(lens):
        prompt[b, :n] = seqs[b][:n]
        pad[b, :n] = False
    with torch.no_grad():
        cache = m.kv_cache(N, P + steps)
        m(prompt, prompt, prompt, cache=cache, is_causal=True, key_padding_mask=pad)
        cache.lengths.copy_(torch.tensor(lens))  # the next tokens overwrite the padding
        outs = []
        for s in range(steps):
            x = torch.stack([seqs[b][lens[b] + s] for b in range(N)]).unsqueeze(1)
            outs.append(m(x, x, x, cache=cache, is_causal=True, need_weights=False)[0])
        for b, n in enumerate(lens):
            alone = m(seqs[b][None], seqs[b][None], seqs[b][None], is_causal=True)[0][0, n:]
            got = torch.cat([o[b] for o in outs], 0)
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [n + steps for n in lens]


def test_key_padding_over_the_cache():
    m = mha(batch_first=True)
    N, L = 2, 10
    x = torch.randn(N, L, 48)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, 2] = kpm[1, 0] = True
    with torch.no_grad():
        full = m(x, x, x, is_causal=True, key_padding_mask=kpm)[0]
        cache = m.kv_cache(N, L)
        inc = torch.cat([m(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=cache,
                           is_causal=True, key_padding_mask=kpm[:, :t + 1])[0]
                         for t in range(L)], 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_reorder_equals_recomputing_reordered_histories():
    m = mha(batch_first=True)
    N, L = 3, 7
    x = torch.randn(N, L, 48)
    index = torch.tensor([2, 0, 0, 1, 2])  # keep, duplicate, grow the batch (beams)
    nxt = torch.randn(5, 1, 48)
    with torch.no_grad():
        cache = m.kv_cache(6, L + 1)
        cache.reset(N)
        m(x, x, x, cache=cache, is_causal=True)
        cache.reorder(index)
        assert cache.batch == 5 and cache.lengths.tolist() == [L] * 5
        got = m(nxt, nxt, nxt, cache=cache, is_causal=True)[0]
        hist = torch.cat([x[index], nxt], 1)
        want = m(hist, hist, hist, is_causal=True)[0][:, -1:]
        enc = torch.randn(N, 4, 48)
        memory = m.memory_cache(enc, torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]]).bool())
        memory.reorder(index)
        a = m(nxt, None, None, cache=memory)[0]
        b = m(nxt, enc[index], enc[index], key_padding_mask=memory.key_padding_mask)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16, torch.int8])
def test_compiled_decode_step_does_not_recompile_as_the_cache_grows(cache_dtype):
    import torch._dynamo.testing
    m = mha(batch_first=True)
    cache = m.kv_cache(2, 40, cache_dtype=cache_dtype)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    @torch.compile(fullgraph=True, backend=counter)
    def step(x, cache):
        return m(x, x, x, cache=cache, is_causal=True, need_weights=False)[0]

    x = torch.randn(2, 12, 48)
    with torch.no_grad():
        inc = torch.cat([step(x[:, t:t + 1], cache) for t in range(12)], 1)
        # A smaller storage: the eager steps on the same storage (the compiled step adds no
        # error of its own).
        eager = m.kv_cache(2, 40, cache_dtype=cache_dtype)
        full = (m(x, x, x, is_causal=True)[0] if cache_dtype is None else torch.cat(
            [m(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], cache=eager, is_causal=True)[0]
             for t in range(12)], 1))
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    assert cache.lengths.tolist() == [12, 12]


def test_export_captures_a_decode_step():
    m = mha(batch_first=True)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = m

        def forward(self, x, key_cache, value_cache, lengths):
            cache = fusedattn.KVCache.from_tensors(key_cache, value_cache, lengths, read_only=False)
            return self.attn(x, x, x, cache=cache, is_causal=True, need_weights=False)[0]

    c = m.kv_cache(2, 16)
    ep = torch.export.export(Step(), (torch.randn(2, 1, 48), c.key_cache, c.value_cache, c.lengths))
    run = ep.module()
    c = m.kv_cache(2, 16)
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        inc = torch.cat([run(x[:, t:t + 1], c.key_cache, c.value_cache, c.lengths) for t in range(5)], 1)
        full = m(x, x, x, is_causal=True)[0]
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    assert c.lengths.tolist() == [5, 5]


def test_opcheck():
    kc, vc = filled_cache(2, 2, 20, 8, 6, [4, 9], torch.float32)
    args = (torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 6), kc, vc,
            torch.tensor([4, 9]))
    torch.library.opcheck(op, args, dict(is_causal=True, return_lse=True),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- errors


def test_misuse_is_named():
    m = mha(batch_first=True)
    x = torch.randn(2, 1, 48)
    cache = m.kv_cache(2, 4)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="query's batch"):
            m(x[:1], x[:1], x[:1], cache=cache, is_causal=True)
        with pytest.raises(RuntimeError, match="dtype"):
            mha(torch.float64, batch_first=True)(x.double(), x.double(), x.double(),
                                                 cache=cache)
        with pytest.raises(ValueError, match="attn_mask"):
            m(x, x, x, cache=cache, attn_mask=torch.zeros(1, 1))
        with pytest.raises(ValueError, match="read-only"):
            m(x, x, x, cache=m.memory_cache(torch.randn(2, 3, 48)))
        with pytest.raises(ValueError, match="key and value"):
            m(x, x, None, cache=cache)
        with pytest.raises(TypeError, match="KVCache"):
            m(x, x, x, cache=(torch.zeros(1), torch.zeros(1)))
        with pytest.raises(ValueError, match="reorder: index values"):
            cache.reorder(torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="max_batch"):
            cache.reorder(torch.tensor([0, 1, 1]))
        with pytest.raises(ValueError, match="max_batch"):
            cache.reset(3)
        with pytest.raises(RuntimeError, match="key_padding_mask"):
            m(x, x, x, cache=cache, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
        for t in range(4):
            m(x, x, x, cache=cache)
        with pytest.raises(RuntimeError, match="cache is full: sequence 0 has 4 cached positions"):
            m(x, x, x, cache=cache)
    assert cache.lengths.tolist() == [4, 4]  # a refused append leaves the cache as it was
    with pytest.raises(ValueError, match="max_len must be positive"):
        fusedattn.KVCache(1, 0, 2, 8)
    with pytest.raises(TypeError, match="head_dim must be an int"):
        fusedattn.KVCache(1, 4, 2, 8.0)
    with pytest.raises(ValueError, match="add_bias_kv"):
        fusedattn.MultiheadAttention(48, 4, add_bias_kv=True).eval()(x, x, x, cache=cache)
    with pytest.raises(ValueError, match="variants"):
        fusedattn.MultiheadAttention(48, 4, window=(2, 0)).eval()(x, x, x, cache=cache)
    d = fusedattn.MultiheadAttention(48, 4, dropout=0.1, batch_first=True)
    with pytest.raises(ValueError, match="dropout"):
        d(x, x, x, cache=d.kv_cache(2, 4))
    # Outside no_grad the step runs; a backward through it says why it cannot.
    cache.reset()
    out, _ = m(x, x, x, cache=cache)
    with pytest.raises(RuntimeError, match="gradients through a KV cache are not supported"):
        out.sum().backward()
    q = torch.randn(2, 4, 1, 48 // 4)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        op(q, None, None, torch.zeros(2, 2, 4, 12), torch.zeros(2, 2, 4, 12), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="lengths must be a 1-D int64"):
        op(q, None, None, torch.zeros(2, 4, 4, 12), torch.zeros(2, 4, 4, 12), torch.zeros(2))
    with pytest.raises(RuntimeError, match="negative"):
        op(q, None, None, torch.zeros(2, 4, 4, 12), torch.zeros(2, 4, 4, 12), torch.tensor([0, -1]))
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        op(q, None, None, torch.zeros(2, 4, 12, 4).transpose(2, 3), torch.zeros(2, 4, 4, 12),
           torch.tensor([0, 1]))

"""Greedy generation with a decoder-only Transformer, in one run (CPU): fusedattn's KVCache
against (a) the same model on torch.nn.MultiheadAttention recomputing the whole prefix every
token and (b) a careful hand-written cache around F.scaled_dot_product_attention
(preallocated buffers, new keys written in place, no torch.cat). All three share the weights.

Per-token latency at cache length n: the cache is filled to n by one prefill call, then one
new token per step, the length set back to n after each step (so every timed step sees n
cached positions); medians of interleaved steps. tokens/s = batch / latency. fusedattn runs
once per cache storage (--cache-dtypes: the model's dtype, bf16 and int8 for an fp32 model,
int8 for a bf16 one), each against the same (b). Also greedy decoding from a 128-token
prompt: fusedattn's full cache checked equal (fp32) to (b), and each smaller storage's tokens
compared with the full cache's. Writes benchmarks/results/generate.json.

  python benchmarks/bench_generate.py [--quick]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import advance, cpu_model, progress_bar, time_pair  # noqa: E402

import fusedattn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class Block(nn.Module):
    def __init__(self, d, h, dtype):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, dtype=dtype), nn.LayerNorm(d, dtype=dtype)
        self.attn = fusedattn.MultiheadAttention(d, h, batch_first=True, dtype=dtype)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d, dtype=dtype), nn.GELU(),
                                nn.Linear(4 * d, d, dtype=dtype))


class Decoder(nn.Module):
    """Pre-norm decoder-only LM: the three attention implementations below run its blocks."""

    def __init__(self, vocab=1000, d=512, h=8, layers=6, max_len=4096, dtype=torch.float32):
        super().__init__()
        self.h = h
        self.tok = nn.Embedding(vocab, d, dtype=dtype)
        self.pos = nn.Embedding(max_len, d, dtype=dtype)
        self.blocks = nn.ModuleList(Block(d, h, dtype) for _ in range(layers))
        self.ln = nn.LayerNorm(d, dtype=dtype)
        self.head = nn.Linear(d, vocab, bias=False, dtype=dtype)
        # (a): torch's module on the same weights
        self.torch_attn = nn.ModuleList()
        for b in self.blocks:
            t = nn.MultiheadAttention(d, h, batch_first=True, dtype=dtype)
            t.load_state_dict(b.attn.state_dict())
            self.torch_attn.append(t)

    def embed(self, tokens, start):
        pos = torch.arange(start, start + tokens.shape[1])
        return self.tok(tokens) + self.pos(pos)

    def logits(self, x):
        return self.head(self.ln(x[:, -1]))

    # fusedattn: one KVCache per layer
    def step_fused(self, tokens, caches, start):
        x = self.embed(tokens, start)
        for b, c in zip(self.blocks, caches):
            h = b.ln1(x)
            x = x + b.attn(h, h, h, cache=c, is_causal=True, need_weights=False)[0]
            x = x + b.ff(b.ln2(x))
        return self.logits(x)

    # (b): preallocated buffers around SDPA
    def step_sdpa(self, tokens, bufs, start):
        x = self.embed(tokens, start)
        n, t, d = x.shape
        end = start + t
        for b, (kb, vb) in zip(self.blocks, bufs):
            h = b.ln1(x)
            q, k, v = F.linear(h, b.attn.in_proj_weight, b.attn.in_proj_bias).view(
                n, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            kb[:n, :, start:end] = k
            vb[:n, :, start:end] = v
            o = F.scaled_dot_product_attention(q, kb[:n, :, :end], vb[:n, :, :end], is_causal=t > 1)
            o = F.linear(o.transpose(1, 2).reshape(n, t, d), b.attn.out_proj.weight,
                         b.attn.out_proj.bias)
            x = x + o
            x = x + b.ff(b.ln2(x))
        return self.logits(x)

    # (a): torch.nn.MultiheadAttention over the whole prefix
    def step_recompute(self, tokens):
        x = self.embed(tokens, 0)
        L = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype)
        for b, a in zip(self.blocks, self.torch_attn):
            h = b.ln1(x)
            x = x + a(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
            x = x + b.ff(b.ln2(x))
        return self.logits(x)

    def fused_caches(self, batch, max_len, cache_dtype=None):
        return [b.attn.kv_cache(batch, max_len, cache_dtype=cache_dtype) for b in self.blocks]

    def sdpa_buffers(self, batch, max_len):
        d = self.tok.embedding_dim
        shape = (batch, self.h, max_len, d // self.h)
        dt = self.tok.weight.dtype
        return [(torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt)) for _ in self.blocks]


def latency_case(model, batch, n, repeats, budget, recompute, storages):
    """Median seconds per decode step at n cached positions: fusedattn with each cache
    storage (None: the model's dtype), then (b), then (a) when recompute."""
    g = torch.Generator().manual_seed(n)
    prompt = torch.randint(0, 1000, (batch, n), generator=g)
    nxt = torch.randint(0, 1000, (batch, 1), generator=g)
    caches = [model.fused_caches(batch, n + 1, s) for s in storages]
    bufs = model.sdpa_buffers(batch, n + 1)
    for c in caches:
        model.step_fused(prompt, c, 0)
    model.step_sdpa(prompt, bufs, 0)

    def fused(c):
        def run():
            model.step_fused(nxt, c, n)
            for layer in c:
                layer.lengths.fill_(n)
        return run

    def sdpa():
        model.step_sdpa(nxt, bufs, n)

    full = torch.cat([prompt, nxt], 1)
    # The cached steps agree (the same token's logits): the full cache's with (b).
    a = model.step_fused(nxt, caches[0], n)
    for layer in caches[0]:
        layer.lengths.fill_(n)
    b = model.step_sdpa(nxt, bufs, n)
    err = (a.float() - b.float()).abs().max().item()
    # The cached steps alternate, the order reversed every round, so that none always runs
    # after another's cache footprint; recomputing (which evicts the weights from the
    # caches) is timed apart.
    times = time_alternating([fused(c) for c in caches] + [sdpa], repeats, budget)
    if recompute:
        times += time_pair([lambda: model.step_recompute(full)], max(3, repeats // 3), budget)
    return times, err


def time_alternating(fns, repeats, budget_s):
    """Median seconds of each fn, the order reversed every round."""
    import time
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    order = list(range(len(fns)))
    while True:
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
        order.reverse()
        n = len(times[0])
        if n >= repeats or (n >= 3 and time.perf_counter() - start > budget_s):
            break
    return [sorted(ts)[len(ts) // 2] for ts in times]


def op_case(dtype, batch, n, repeats, storages, heads=8, head_dim=64):
    """One attention decode step alone: kv_cache_attention (append + attend) on a cache of
    each storage against the new keys written into a preallocated buffer and SDPA on its
    filled prefix. -> seconds per storage, then SDPA's."""
    g = torch.Generator().manual_seed(n)
    kc, vc = (torch.randn(batch, heads, n + 1, head_dim, generator=g).to(dtype) for _ in range(2))
    q, k, v = (torch.randn(batch, heads, 1, head_dim, generator=g).to(dtype) for _ in range(3))

    def fused(storage):
        c = fusedattn.KVCache.from_tensors(kc, vc, read_only=False, cache_dtype=storage)

        def run():
            c.lengths.fill_(n)
            c.attend(q, k, v, is_causal=True)
        return run

    def sdpa():
        kc[:, :, n:n + 1] = k
        vc[:, :, n:n + 1] = v
        F.scaled_dot_product_attention(q, kc[:, :, :n + 1], vc[:, :, :n + 1])
    return time_alternating([fused(s) for s in storages] + [sdpa], repeats, 5.0)


def storage_name(s):
    return "model" if s is None else {torch.bfloat16: "bf16", torch.float16: "fp16",
                                      torch.int8: "int8"}[s]


def greedy(model, step, state, prompt, new_tokens):
    tokens = prompt
    logits = step(prompt, state, 0)
    out = []
    for i in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = step(nxt, state, prompt.shape[1] + i)
    return torch.cat(out, 1), tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--cache-dtypes", default="model,bf16,int8",
                    help="fusedattn cache storages to time (a storage equal to the model's "
                         "dtype is skipped)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--lengths", default="128,512,1024,2048")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "generate.json"))
    ap.add_argument("--op-only", action="store_true", help="only the attention step alone")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.repeats, args.batches = "128,1024", 5, "1,8"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    named = {"model": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]

    def storages_for(dname):
        out = [None]
        for name in args.cache_dtypes.split(","):
            s = named[name]
            if s is not None and s != dtypes[dname] and s not in out:
                out.append(s)
        return out

    torch.manual_seed(0)
    rows, op_rows = [], []
    with torch.inference_mode():
        for dname in args.dtypes.split(","):
            storages = storages_for(dname)
            for batch in batches:
                for n in lengths:
                    *tf, ts = op_case(dtypes[dname], batch, n, 20 * args.repeats, storages)
                    for s, t in zip(storages, tf):
                        op_rows.append(dict(dtype=dname, cache_dtype=storage_name(s), batch=batch,
                                            cache_len=n, fused_us=t * 1e6, sdpa_cache_us=ts * 1e6,
                                            speedup=ts / t))
    print(f"attention step alone (8 heads x 64), CPU: {cpu_model()}")
    for r in op_rows:
        print(f"  {r['dtype']:5} cache {r['cache_dtype']:5} batch {r['batch']} length "
              f"{r['cache_len']:5}: fusedattn {r['fused_us']:7.1f} us, SDPA + buffer writes "
              f"{r['sdpa_cache_us']:7.1f} us ({r['speedup']:.2f}x)")
    if args.op_only:
        return
    cases = [(d, b, n) for d in args.dtypes.split(",") for b in batches for n in lengths]
    progress = progress_bar(len(cases) + 1)
    models = {}
    with torch.inference_mode():
        for dname, batch, n in cases:
            model = models.get(dname)
            if model is None:
                torch.manual_seed(0)
                model = models[dname] = Decoder(dtype=dtypes[dname]).eval()
            storages = storages_for(dname)
            recompute = n <= 512 or batch == 1
            times, err = latency_case(model, batch, n, args.repeats, 20.0, recompute, storages)
            tf, ts, tr = times[:len(storages)], times[len(storages)], times[len(storages) + 1:]
            for s, t in zip(storages, tf):
                # The cache's bytes per token (all layers, keys and values, int8's scales).
                c = model.blocks[0].attn.kv_cache(1, 1, cache_dtype=s)
                per_token = len(model.blocks) * sum(
                    x.element_size() * x.numel() for x in (c.key_cache, c.value_cache,
                                                           c.key_scales, c.value_scales)
                    if x is not None)
                rows.append(dict(dtype=dname, cache_dtype=storage_name(s), batch=batch,
                                 cache_len=n, fused_ms=t * 1e3, sdpa_cache_ms=ts * 1e3,
                                 recompute_ms=tr[0] * 1e3 if tr else None,
                                 fused_tokens_s=batch / t, sdpa_cache_tokens_s=batch / ts,
                                 speedup_vs_sdpa_cache=ts / t,
                                 speedup_vs_recompute=tr[0] / t if tr else None,
                                 cache_bytes_per_token=per_token,
                                 logits_max_diff=err if s is None else None))
            advance(progress, f"{dname} batch {batch} cache {n}")
        # Greedy generation from a 128-token prompt, fp32: fusedattn's full cache and (b) give
        # the same tokens; each smaller storage's tokens against the full cache's.
        model = models.get("fp32") or Decoder().eval()
        prompt = torch.randint(0, 1000, (2, 128))
        a, _ = greedy(model, model.step_fused, model.fused_caches(2, 128 + 64), prompt, 64)
        b, _ = greedy(model, model.step_sdpa, model.sdpa_buffers(2, 128 + 64), prompt, 64)
        same = bool(torch.equal(a, b))
        agree = {}
        for s in storages_for("fp32")[1:]:
            c, _ = greedy(model, model.step_fused, model.fused_caches(2, 128 + 64, s), prompt, 64)
            agree[storage_name(s)] = (c == a).float().mean().item()
        advance(progress, "greedy check")
        progress.close()
    print(f"\nCPU: {cpu_model()}, tier {fusedattn.cpu_capability()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; 6 layers, d_model 512, 8 heads")
    print(f"{'dtype':5} {'cache':>5} {'batch':>5} {'length':>6} {'fusedattn':>10} {'sdpa cache':>11} "
          f"{'recompute':>10} {'tok/s':>8} {'vs (b)':>7} {'vs (a)':>7} {'KiB/token':>9}")
    for r in rows:
        rec = f"{r['recompute_ms']:9.2f}" if r["recompute_ms"] else "        -"
        va = f"{r['speedup_vs_recompute']:6.2f}x" if r["speedup_vs_recompute"] else "      -"
        print(f"{r['dtype']:5} {r['cache_dtype']:>5} {r['batch']:5} {r['cache_len']:6} "
              f"{r['fused_ms']:9.2f}ms {r['sdpa_cache_ms']:9.2f}ms {rec}ms "
              f"{r['fused_tokens_s']:8.1f} {r['speedup_vs_sdpa_cache']:6.2f}x {va} "
              f"{r['cache_bytes_per_token'] / 1024:9.1f}")
    print(f"greedy decoding, 64 tokens from a 128-token prompt: fusedattn and the SDPA cache "
          f"{'agree' if same else 'DIFFER'}")
    for name, frac in agree.items():
        print(f"  {name} cache: {100 * frac:.1f}% of the tokens equal to the full cache's")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(cpu=cpu_model(), tier=fusedattn.cpu_capability(), torch=torch.__version__,
                       threads=torch.get_num_threads(), rows=rows, op_rows=op_rows,
                       greedy_tokens_agree=same, greedy_agreement_with_full_cache=agree),
                  f, indent=1)


if __name__ == "__main__":
    main()

"""Attention variants against PyTorch in one run (CPU): sliding window, ALiBi, soft-capping,
a learned relative position bias.

For each case: fusedattn with the variant, fusedattn's plain call of the same size (the
variant's own cost), SDPA given the equivalent mask (a materialised bool window or ALiBi's
float bias; softcap has no SDPA form, so the same math written out in ATen), and FlexAttention
in eager mode and compiled (forward; on the CPU it has no backward; compiled it gets the causal
or window structure as a block mask, so that it skips blocks too). Medians of interleaved
calls; writes benchmarks/results/variants.json.

  python benchmarks/bench_variants.py [--quick]
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cpu_model, fwd_bwd, peak_mb, time_pair  # noqa: E402

import fusedattn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    # One compiled flex_attention serves every case: each (score_mod, dtype, L) is a recompile.
    for _limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, _limit):
            setattr(torch._dynamo.config, _limit, 64)
    flex_compiled = torch.compile(flex_attention)
except ImportError:  # older torch
    flex_attention = flex_compiled = None


def rel_positions(L):
    return torch.arange(L)[None, :] - torch.arange(L)[:, None]  # j - i


def case(variant, dtype, L, B=4, H=8, E=64):
    """(inputs, {name: fn}) with fn(q, k, v) -> out."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, generator=g).to(dtype) for _ in range(3))
    rel = rel_positions(L)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)])
    fns = {"fusedattn plain": lambda q, k, v: fusedattn.attention(q, k, v, is_causal=True)}
    # Compiled FlexAttention: the visible keys as a block mask, the rest as a score_mod.
    mask_mod = lambda b, h, i, j: j <= i
    score_mod = None
    if variant == "window":  # left 256, right 0 (causal)
        allowed = (rel <= 0) & (rel >= -256)
        fns["fusedattn"] = lambda q, k, v: fusedattn.attention(q, k, v, window=(256, 0))
        fns["sdpa bool mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        mod = lambda score, b, h, i, j: torch.where((j <= i) & (j >= i - 256), score, -math.inf)
        mask_mod = lambda b, h, i, j: (j <= i) & (j >= i - 256)
    elif variant == "alibi":
        bias = (-slopes[:, None, None] * rel.abs()).masked_fill(rel > 0, -math.inf).to(dtype)
        fns["fusedattn"] = lambda q, k, v: fusedattn.attention(q, k, v, is_causal=True, alibi_slopes=slopes)
        fns["sdpa float mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        mod = lambda score, b, h, i, j: torch.where(j <= i, score - slopes[h] * (i - j).abs(), -math.inf)
        score_mod = lambda score, b, h, i, j: score - slopes[h] * (i - j).abs()
    elif variant == "softcap":
        cap = 30.0

        def math_softcap(q, k, v):
            s = cap * torch.tanh((q @ k.transpose(-1, -2)) / math.sqrt(E) / cap)
            s = s.masked_fill(rel > 0, -math.inf)
            return torch.softmax(s.float(), -1).to(v.dtype) @ v
        fns["fusedattn"] = lambda q, k, v: fusedattn.attention(q, k, v, is_causal=True, softcap=cap)
        fns["math (ATen)"] = math_softcap
        cap_t = torch.tensor(cap)  # a tensor: flex_attention's tracing refuses a captured float
        mod = lambda score, b, h, i, j: torch.where(j <= i, cap_t * torch.tanh(score / cap_t), -math.inf)
        score_mod = lambda score, b, h, i, j: cap_t * torch.tanh(score / cap_t)
    elif variant == "rel_bias":  # a learnable (H, 2D+1) table, D = 128; its gradient on both sides
        D = 128
        table = torch.randn(H, 2 * D + 1, requires_grad=True)
        idx = rel.clamp(-D, D) + D
        fns["fusedattn"] = lambda q, k, v: fusedattn.attention(q, k, v, is_causal=True, rel_bias=table)

        def sdpa_rel(q, k, v):
            bias = table[:, idx].masked_fill(rel > 0, -math.inf).to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        fns["sdpa float mask"] = sdpa_rel
        mod = lambda score, b, h, i, j: torch.where(j <= i, score + table[h, (j - i).clamp(-D, D) + D], -math.inf)
        table_nograd = table.detach()
        score_mod = lambda score, b, h, i, j: score + table_nograd[h, (j - i).clamp(-D, D) + D]
    else:
        raise ValueError(variant)
    flex = None
    if flex_attention is not None:
        try:
            with torch.no_grad():
                flex_attention(q[:1, :1, :64], k[:1, :1, :64], v[:1, :1, :64], score_mod=mod)
            flex = lambda q, k, v: flex_attention(q, k, v, score_mod=mod)
        except Exception as e:  # noqa: BLE001 - reported, the rest still runs
            print(f"flex_attention unavailable for {variant}: {type(e).__name__}", file=sys.stderr)
    compiled = None
    if flex_compiled is not None:
        try:
            block_mask = create_block_mask(mask_mod, None, None, L, L, device="cpu")
            with torch.no_grad():
                flex_compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)  # compiles
            compiled = lambda q, k, v: flex_compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
        except Exception as e:  # noqa: BLE001 - reported, the rest still runs
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"compiled flex_attention unavailable for {variant} {dtype}: {type(e).__name__}: {first}",
                  file=sys.stderr)
    return (q, k, v), fns, flex, compiled


def main():
    # As bench.py: every block >= 64 KiB its own mapping, so the RSS high-water mark sees peaks.
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--cases", default="window,alibi,softcap,rel_bias,varlen")
    args = ap.parse_args()
    wanted = set(args.cases.split(","))
    repeats = 3 if args.quick else args.repeats
    plan = [("window", d, L) for d in (torch.float32, torch.bfloat16) for L in ((2048,) if args.quick else (2048, 4096))]
    plan += [(v, d, L) for v in ("alibi", "softcap", "rel_bias") for d in (torch.float32, torch.bfloat16)
             for L in ((1024,) if args.quick else (1024, 2048))]
    plan = [c for c in plan if c[0] in wanted]
    rows = []
    for variant, dtype, L in plan:
        inputs, fns, flex, compiled = case(variant, dtype, L)
        for mode in ("fwd", "fwd+bwd"):
            names = list(fns)
            if mode == "fwd":
                runs = []
                for n in names:
                    fn = fns[n]
                    runs.append(lambda fn=fn: fn(*inputs))
                if flex is not None:
                    names.append("flex eager")
                    runs.append(lambda: flex(*inputs))
                if compiled is not None:
                    names.append("flex compiled")
                    runs.append(lambda: compiled(*inputs))
                with torch.no_grad():
                    times = time_pair(runs, repeats, 20.0)
                    peaks = [peak_mb(r) for r in runs]
            else:
                runs = [fwd_bwd(fns[n], inputs) for n in names]
                times = time_pair(runs, repeats, 20.0)
                peaks = [peak_mb(r) for r in runs]
            row = dict(case=variant, dtype=str(dtype)[6:], L=L, mode=mode,
                       ms={n: t * 1e3 for n, t in zip(names, times)},
                       peak_mb={n: m for n, m in zip(names, peaks)})
            ours = row["ms"]["fusedattn"]
            row["speedup"] = {n: t / ours for n, t in row["ms"].items() if n != "fusedattn"}
            rows.append(row)
            others = ", ".join(f"{n} {t:.1f} ms ({row['speedup'][n]:.2f}x)" for n, t in row["ms"].items()
                               if n != "fusedattn")
            print(f"{variant:<8}{row['dtype']:<10}L={L:<6}{mode:<8} fusedattn {ours:8.1f} ms "
                  f"(peak {row['peak_mb']['fusedattn']:.0f} MiB); {others}", flush=True)
    # varlen: 16 sequences of 32..1024 (fixed draw), packed, against the same batch padded to
    # the longest with a key padding mask; the work ratio sum(L_max^2) / sum(L_b^2) beside.
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 1025, (16,), generator=g).tolist()
    lengths[0] = 1024
    T, H, E = max(lengths), 8, 64
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    for dtype in ((torch.float32, torch.bfloat16) if "varlen" in wanted else ()):
        packed = [torch.randn(sum(lengths), H, E, generator=g).to(dtype) for _ in range(3)]
        padded = []
        for x in packed:
            p = x.new_zeros(len(lengths), T, H, E)
            for b, n in enumerate(lengths):
                p[b, :n] = x[cu[b]:cu[b + 1]]
            padded.append(p.transpose(1, 2))
        pad = torch.arange(T)[None] >= torch.tensor(lengths)[:, None]
        allowed = ~pad[:, None, None, :]
        fns = {"fusedattn": lambda q, k, v: fusedattn.attention_varlen(q, k, v, cu, cu, T, T, is_causal=True)}

        def per_sequence(q, k, v):  # one fused call per sequence on views, as a user would loop
            return torch.cat([fusedattn.attention(*(x[cu[b]:cu[b + 1]].transpose(0, 1) for x in (q, k, v)),
                                                  is_causal=True).transpose(0, 1)
                              for b in range(len(lengths))])
        pfns = {"fusedattn per sequence": None,
                "fusedattn padded": lambda q, k, v: fusedattn.attention(q, k, v, is_causal=True, key_padding_mask=pad),
                "sdpa padded": lambda q, k, v: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=allowed & torch.ones(T, T, dtype=torch.bool).tril())}
        work = len(lengths) * T * T / sum(n * n for n in lengths)
        # What the padded fused call computes: it skips the keys past each sequence's length
        # (trailing padding) but not the padded queries, which see all L_b keys.
        padded_work = sum(n * n / 2 + n * (T - n) for n in lengths) / sum(n * n / 2 for n in lengths)
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                runs = [lambda: fns["fusedattn"](*packed), lambda: per_sequence(*packed)] + \
                    [lambda f=f: f(*padded) for n, f in pfns.items() if f is not None]
                with torch.no_grad():
                    times = time_pair(runs, repeats, 20.0)
            else:
                runs = [fwd_bwd(fns["fusedattn"], packed), fwd_bwd(per_sequence, packed)] + \
                    [fwd_bwd(f, padded) for f in pfns.values() if f is not None]
                times = time_pair(runs, repeats, 20.0)
            names = ["fusedattn"] + list(pfns)
            row = dict(case="varlen", dtype=str(dtype)[6:], L=T, mode=mode, work_ratio=work,
                       fused_padded_work_ratio=padded_work,
                       ms={n: t * 1e3 for n, t in zip(names, times)})
            row["speedup"] = {n: t / row["ms"]["fusedattn"] for n, t in row["ms"].items() if n != "fusedattn"}
            rows.append(row)
            print(f"varlen  {row['dtype']:<10}16 seqs 32..1024 causal {mode:<8} fusedattn {row['ms']['fusedattn']:8.1f} ms; "
                  + ", ".join(f"{n} {row['ms'][n]:.1f} ms ({row['speedup'][n]:.2f}x)" for n in pfns)
                  + f"; work ratio {work:.2f} (the padded fused call's own {padded_work:.2f})", flush=True)

    meta = dict(torch=torch.__version__, cpu=cpu_model(), threads=torch.get_num_threads(),
                fusedattn_tier=fusedattn.cpu_capability())
    print(f"CPU: {meta['cpu']}; tier {meta['fusedattn_tier']}; {meta['threads']} threads; torch {meta['torch']}; "
          "B=4 H=8 E=64; speedup = their time / fusedattn's")
    os.makedirs(args.out, exist_ok=True)
    name = "variants.json" if wanted >= {"window", "alibi", "softcap", "rel_bias", "varlen"} else \
        "variants_" + "_".join(sorted(wanted)) + ".json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""fusedattn against PyTorch on this machine, side by side in one run.

    python benchmarks/bench.py                 # the full grid (tens of minutes on 2 cores)
    python benchmarks/bench.py --quick         # L <= 1024, fewer repeats
    python benchmarks/bench.py --max-len 2048 --dtypes float32

For each case it times fusedattn and the PyTorch path a user would otherwise take, in the same
process, alternating, median over repeats after a warm-up: forward, and forward + backward.
Beside them, alternating with the same calls, a 2048^3 GEMM of the case's dtype (torch.mm: MKL
or oneDNN), so each attention case also reads as GFLOP/s and as a share of the GEMM rate this
machine gave in the same minutes (the host's speed drifts; a rate from another run would not
compare). FLOPs counted as FlashAttention's benchmarks count them: the forward 4 B H L S E
(two products), halved when causal; forward + backward 3.5 times that (five more products).
Peak memory is the growth of the process's resident-set high-water mark during one call
(Linux: /proc/self/clear_refs). Prints a table, writes JSON and a PNG plot (with matplotlib).
"""
import argparse
import json
import math
import os
import platform
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import fusedattn

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- measuring
def _status_mb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def peak_mb(fn):
    """Extra resident memory at the high-water mark of one call of fn, in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _status_mb("VmRSS")
    fn()
    return max(_status_mb("VmHWM") - before, 0.0)


def time_pair(fns, repeats, budget_s):
    """Median seconds of each fn, calls interleaved so machine noise hits all of them."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    start = time.perf_counter()
    while True:
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        n = len(times[0])
        if n >= repeats or (n >= 3 and time.perf_counter() - start > budget_s):
            break
    return [sorted(ts)[len(ts) // 2] for ts in times]


GEMM_N = 2048


def gemm_fn(dtype):
    """A GEMM_N^3 product of `dtype` (the machine's matrix rate, timed beside each case)."""
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(GEMM_N, GEMM_N, generator=g).to(dtype) for _ in range(2))
    return lambda: torch.mm(a, b)


def attention_flops(B, H, L, S, E, causal, mode):
    fwd = 4 * B * H * L * S * E * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else 3.5 * fwd


def progress_bar(total):
    """A tqdm bar on stderr over `total` cases; each case calls advance(bar, label) when done."""
    return tqdm(total=total, file=sys.stderr, dynamic_ncols=True)


def advance(bar, label):
    bar.set_postfix_str(label, refresh=False)
    bar.update()


# ---------------------------------------------------------------- cases
def attention_case(variant, dtype, L, causal, B=4, H=8, E=64):
    """(fusedattn fn, torch fn, torch's path name) for the op, both returning what is used."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, generator=g).to(dtype) for _ in range(3))
    pad = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        pad[b, L - (b * L) // 8:] = True  # 0, 1/8, 2/8, 3/8 of the keys are padding
    causal_allowed = torch.ones(L, L, dtype=torch.bool).tril()

    if variant == "plain":
        ours = lambda q, k, v: fusedattn.attention(q, k, v, is_causal=causal)
        theirs = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        path = "sdpa"
    elif variant == "key_padding":
        allowed = ~pad[:, None, None, :]
        if causal:
            allowed = allowed & causal_allowed
        ours = lambda q, k, v: fusedattn.attention(q, k, v, is_causal=causal, key_padding_mask=pad)
        theirs = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        path = "sdpa+mask"
    elif variant == "dropout":
        ours = lambda q, k, v: fusedattn.attention(q, k, v, dropout_p=0.1, is_causal=causal)
        theirs = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1,
                                                                 is_causal=causal)
        path = "sdpa+dropout"
    elif variant == "weights":
        def ours(q, k, v):
            out, w, _ = fusedattn.attention(q, k, v, is_causal=causal, return_weights=True)
            return out, w

        def theirs(q, k, v):  # what torch offers for weights: the math, written out
            s = (q @ k.transpose(-2, -1)) / math.sqrt(E)
            if causal:
                s = s.masked_fill(~causal_allowed, float("-inf"))
            w = torch.softmax(s, -1)
            return w @ v, w
        path = "math"
    else:
        raise ValueError(variant)
    return (q, k, v), ours, theirs, path


def module_case(kind, N=32, L=128, S=128, E=512, H=8):
    torch.manual_seed(0)
    ours = fusedattn.MultiheadAttention(E, H, batch_first=True)
    theirs = nn.MultiheadAttention(E, H, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(N, L, E)
    mem = torch.randn(N, S, E) if kind == "cross" else x
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[N // 2:, S * 3 // 4:] = True
    return ours, theirs, x, mem, pad


def fwd_bwd(fn, inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run():
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs[0], torch.ones_like(outs[0]))
    return run


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    # glibc keeps freed blocks below its (adaptive) mmap threshold, which hides peaks from
    # the RSS high-water mark: make every block >= 64 KiB its own mapping, returned on free.
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    ap = argparse.ArgumentParser(description="fusedattn vs PyTorch on the CPU")
    ap.add_argument("--quick", action="store_true", help="L <= 1024 and fewer repeats")
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--variants", default="plain,key_padding,dropout,weights")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--skip-modules", action="store_true", help="no MultiheadAttention cases")
    ap.add_argument("--matmul-precision", default="highest", choices=("highest", "high", "medium"),
                    help="torch.set_float32_matmul_precision for the whole run (both libraries "
                         "and the GEMM): 'medium' allows bf16 products for fp32")
    args = ap.parse_args()
    torch.set_float32_matmul_precision(args.matmul_precision)
    max_len = min(args.max_len, 1024) if args.quick else args.max_len
    repeats = 3 if args.quick else args.repeats
    budget = 2.0 if args.quick else 10.0
    lengths = [n for n in (128, 512, 1024, 2048, 4096, 8192) if n <= max_len]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    variants = args.variants.split(",")

    cases = [(v, d, n, c) for v in variants for d in dtypes for n in lengths for c in (False, True)]
    # (kind, N, L, E): an encoder's size, its cross-attention, a long sequence with the same
    # number of tokens, and a smaller model (E=256) at L=512.
    module_cases = [] if args.skip_modules else [("self", 32, 128, 512), ("cross", 32, 128, 512),
                                                 ("self", 4, 1024, 512), ("self", 8, 512, 256)]
    progress = progress_bar(len(cases) * 2 + 3 * len(module_cases))
    rows = []
    with torch.inference_mode(False):
        for variant, dtype, L, causal in cases:
            inputs, ours, theirs, path = attention_case(variant, dtype, L, causal)
            for mode in ("fwd", "fwd+bwd"):
                label = f"{variant} {str(dtype)[6:]} L={L} {'causal' if causal else ''} {mode}"
                gemm = gemm_fn(dtype)
                if mode == "fwd":
                    with torch.no_grad():
                        fa = lambda: ours(*inputs)
                        tb = lambda: theirs(*inputs)
                        t_ours, t_theirs, t_gemm = time_pair([fa, tb, gemm], repeats, budget)
                        m_ours, m_theirs = peak_mb(fa), peak_mb(tb)
                else:
                    fa, tb = fwd_bwd(ours, inputs), fwd_bwd(theirs, inputs)
                    t_ours, t_theirs, t_gemm = time_pair([fa, tb, gemm], repeats, budget)
                    m_ours, m_theirs = peak_mb(fa), peak_mb(tb)
                B, H, _, E = inputs[0].shape
                flops = attention_flops(B, H, L, L, E, causal, mode)
                gemm_gflops = 2 * GEMM_N ** 3 / t_gemm / 1e9
                rows.append(dict(case=variant, dtype=str(dtype)[6:], L=L, causal=causal, mode=mode,
                                 torch_path=path, fusedattn_ms=t_ours * 1e3,
                                 torch_ms=t_theirs * 1e3, speedup=t_theirs / t_ours,
                                 fusedattn_gflops=flops / t_ours / 1e9,
                                 torch_gflops=flops / t_theirs / 1e9, gemm_gflops=gemm_gflops,
                                 share_of_gemm=flops / t_ours / 1e9 / gemm_gflops,
                                 fusedattn_peak_mb=m_ours, torch_peak_mb=m_theirs))
                advance(progress, label)
        # need_weights=True is nn.MultiheadAttention's default and its O(L^2) path (scores,
        # softmax and the head-averaged weights written out); False lets it call SDPA.
        # An encoder's size (N=32, L=128, E=512), and (self-attention) a long sequence with the same
        # number of tokens, where attention rather than the projections dominates the step.
        for kind, N, L, E in module_cases:
            ours, theirs, x, mem, pad = module_case(kind, N=N, L=L, S=L, E=E)
            for with_pad, weights in ((False, False), (True, False), (True, True)):
                kw = {"key_padding_mask": pad} if with_pad else {}

                def step(m):
                    def run():
                        out, _ = m(x, mem, mem, need_weights=weights, **kw)
                        out.sum().backward()
                    return run
                t_ours, t_theirs = time_pair([step(ours), step(theirs)], repeats, budget)
                rows.append(dict(case=f"mha_{kind}" + ("+pad" if with_pad else "") + ("+weights" if weights else ""),
                                 dtype="float32", L=L, N=N, E=E, causal=False, mode="fwd+bwd",
                                 torch_path="nn.MHA" + (" need_weights" if weights else " (SDPA)"),
                                 fusedattn_ms=t_ours * 1e3,
                                 torch_ms=t_theirs * 1e3, speedup=t_theirs / t_ours,
                                 fusedattn_peak_mb=peak_mb(step(ours)),
                                 torch_peak_mb=peak_mb(step(theirs))))
                advance(progress, f"MultiheadAttention {kind} N={N} L={L} E={E} pad={with_pad} weights={weights}")
    progress.close()

    meta = dict(torch=torch.__version__, fusedattn=fusedattn.__version__, threads=torch.get_num_threads(),
                cpu=cpu_model(), fusedattn_tier=fusedattn.cpu_capability(),
                aten_capability=torch.backends.cpu.get_cpu_capability(),
                onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "(not set)"),
                matmul_precision=args.matmul_precision,
                python=platform.python_version())
    print(f"CPU: {meta['cpu']}; fusedattn tier {meta['fusedattn_tier']}, ATen {meta['aten_capability']}, "
          f"ONEDNN_MAX_CPU_ISA {meta['onednn_max_isa']}; {meta['threads']} threads; torch {meta['torch']}; "
          f"fp32 matmul precision {meta['matmul_precision']}")
    print(f"GFLOP/s: fusedattn's; GEMM: a {GEMM_N}^3 torch.mm of the dtype timed alternately in the "
          f"same run; share: fusedattn's rate / the GEMM's")
    header = (f"{'case':<22}{'dtype':<10}{'L':>6} {'causal':<7}{'mode':<9}{'torch path':<22}"
              f"{'fusedattn ms':>13}{'torch ms':>11}{'speedup':>9}{'GFLOP/s':>9}{'GEMM':>7}"
              f"{'share':>7}{'peak MiB ours/torch':>22}")
    print(header)
    print("-" * len(header))
    for r in rows:
        rate = (f"{r['fusedattn_gflops']:>9.0f}{r['gemm_gflops']:>7.0f}{r['share_of_gemm']:>6.0%} "
                if "gemm_gflops" in r else f"{'':>23}")
        print(f"{r['case']:<22}{r['dtype']:<10}{r['L']:>6} {str(r['causal']):<7}{r['mode']:<9}"
              f"{r['torch_path']:<22}{r['fusedattn_ms']:>13.2f}{r['torch_ms']:>11.2f}"
              f"{r['speedup']:>8.2f}x{rate}{r['fusedattn_peak_mb']:>11.0f}/{r['torch_peak_mb']:<10.0f}")

    if module_cases:
        print("MultiheadAttention rows (fwd+bwd, fp32, H=8): " +
              ", ".join(f"{k} N={n} L={l} E={e}" for k, n, l, e in module_cases))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if plot(rows, os.path.join(args.out, "cpu.png")):
        print(f"wrote {args.out}/cpu.json and cpu.png")
    else:
        print(f"wrote {args.out}/cpu.json (pip install matplotlib for the plot)")


def plot(rows, path):
    """Against L, one column per mode: the speedup (top) and fusedattn's share of the same-run
    GEMM rate (bottom); colour = dtype and causality, line = case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    styles = {"plain": ("-", "o"), "key_padding": ("--", "s"), "dropout": (":", "^"),
              "weights": ("-.", "D")}
    colours = {("float32", False): "tab:blue", ("float32", True): "tab:cyan",
               ("bfloat16", False): "tab:red", ("bfloat16", True): "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    for col, mode in enumerate(("fwd", "fwd+bwd")):
        for row, key in enumerate(("speedup", "share_of_gemm")):
            ax = axes[row][col]
            for (variant, (ls, marker)) in styles.items():
                for (dtype, causal), colour in colours.items():
                    pts = [(r["L"], r[key]) for r in rows if r["case"] == variant and key in r
                           and r["mode"] == mode and r["dtype"] == dtype and r["causal"] == causal]
                    if pts:
                        ax.plot(*zip(*pts), ls=ls, marker=marker, color=colour,
                                label=f"{variant} {dtype}{' causal' if causal else ''}")
            ax.set_xscale("log", base=2)
            if key == "speedup":
                ax.axhline(1.0, color="black", lw=0.8)
                ax.set_yscale("log", base=2)
                ax.set_title(f"{mode}: PyTorch time / fusedattn time")
            else:
                ax.set_ylim(0, 1.05)
                ax.set_title(f"{mode}: fusedattn GFLOP/s / same-run {GEMM_N}^3 GEMM GFLOP/s")
                ax.set_xlabel("L = S  (B=4, H=8, E=64)")
    axes[0][0].set_ylabel("speedup (>1: fusedattn faster)")
    axes[1][0].set_ylabel("share of the GEMM rate")
    axes[0][1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def replot(json_path):
    with open(json_path) as f:
        rows = json.load(f)["rows"]
    plot(rows, os.path.splitext(json_path)[0] + ".png")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":  # redraw from a saved JSON
        replot(sys.argv[2])
    else:
        main()

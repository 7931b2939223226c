"""fusedattn's CUDA forward against PyTorch's SDPA backends, side by side in one run.

    python benchmarks/bench_cuda.py            # the full grid (a few minutes on an H100)
    python benchmarks/bench_cuda.py --quick    # L in {1k, 4k}, head dim 128, bf16
    python benchmarks/bench_cuda.py --lengths 512 2048 8192 16384 --dtypes bf16 --repeats 5

For each case: fusedattn on its default route (torch's SDPA for the calls it serves, see
fusedattn.explain), fusedattn's own fused kernel (FUSEDATTN_CUDA_KERNEL=fused) and each SDPA
backend that accepts the call (flash, cuDNN, memory-efficient; math where nothing else does),
same inputs, timed with CUDA events,
median over repeats after a warm-up, reported as TFLOP/s (4 B H L S E multiply-adds counted
as 2 FLOPs each, halved under causality) and as the ratio to the fastest PyTorch backend.
About 16k tokens per batch (B = 16384 / L), H = 2048 / E. Variants: plain, a key padding
mask (PyTorch: a bool attn_mask of shape (B, 1, 1, S)) and a float mask (B, H, L, S) where
PyTorch's flash kernel cannot go. Then MultiheadAttention at an encoder's size
(N=32, L=128, E=512, H=8) against torch.nn.MultiheadAttention. Writes JSON beside it.
"""
import argparse
import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusedattn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import advance, progress_bar  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


@contextlib.contextmanager
def kernel_setting(mode):
    """FUSEDATTN_CUDA_KERNEL=mode inside (unset: the default route), restored after."""
    old = os.environ.pop("FUSEDATTN_CUDA_KERNEL", None)
    if mode is not None:
        os.environ["FUSEDATTN_CUDA_KERNEL"] = mode
    try:
        yield
    finally:
        os.environ.pop("FUSEDATTN_CUDA_KERNEL", None)
        if old is not None:
            os.environ["FUSEDATTN_CUDA_KERNEL"] = old


def cuda_time(fn, repeats):
    """Median milliseconds of fn over repeats, after two warm-up calls; None if it raises."""
    try:
        fn(), fn()
    except RuntimeError:
        return None
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def attention_case(dtype, E, L, causal, variant, repeats, with_math):
    B, H = max(16384 // L, 1), 2048 // E
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=dtype) for _ in range(3))
    lengths = torch.randint(L // 2, L + 1, (B,), device="cuda")
    kpm = torch.arange(L, device="cuda")[None, :] >= lengths[:, None]  # True = padding
    ours_kw, torch_mask = {}, None
    if variant == "key_padding":
        ours_kw = dict(key_padding_mask=kpm)
        torch_mask = ~kpm[:, None, None, :]
    elif variant == "float_mask":
        torch_mask = torch.randn(B, H, L, L, device="cuda", dtype=dtype)
        ours_kw = dict(attn_mask=torch_mask)
    if causal and torch_mask is not None:
        tri = torch.ones(L, L, dtype=torch.bool, device="cuda").tril()
        torch_mask = (torch_mask & tri if torch_mask.dtype == torch.bool
                      else torch_mask.masked_fill(~tri, float("-inf")))
    flops = 4 * B * H * L * L * E * (0.5 if causal else 1.0)
    row = dict(dtype=str(dtype).replace("torch.", ""), E=E, L=L, B=B, H=H, causal=causal,
               variant=variant)
    for name, mode in (("fusedattn", None), ("fusedattn_fused", "fused")):
        with kernel_setting(mode):
            row[name] = cuda_time(
                lambda: fusedattn.attention(q, k, v, is_causal=causal, **ours_kw), repeats)
            row[name + "_route"] = fusedattn.explain(q, k, v, is_causal=causal, **ours_kw)
    for name, backend in BACKENDS.items():
        if name == "math" and not with_math:
            continue

        def run(backend=backend):
            with sdpa_kernel(backend):
                if torch_mask is None:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask)

        row[name] = cuda_time(run, repeats)
    best = min((t for n, t in row.items() if n in BACKENDS and t is not None), default=None)
    row["best_torch"] = best
    row["tflops"] = {n: flops / (row[n] * 1e9) for n in ["fusedattn", "fusedattn_fused", *BACKENDS]
                     if row.get(n) is not None}
    row["ratio"] = best / row["fusedattn"] if best and row["fusedattn"] else None
    row["ratio_fused"] = best / row["fusedattn_fused"] if best and row["fusedattn_fused"] else None
    del q, k, v, torch_mask
    return row


def module_case(dtype, key_padding, repeats):
    N, L, E, H = 32, 128, 512, 8
    ours = fusedattn.MultiheadAttention(E, H, batch_first=True).cuda().to(dtype).eval()
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True).cuda().to(dtype).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(N, L, E, device="cuda", dtype=dtype)
    kpm = None
    if key_padding:
        kpm = torch.arange(L, device="cuda")[None, :] >= torch.randint(L // 2, L + 1, (N, 1), device="cuda")
    row = dict(dtype=str(dtype).replace("torch.", ""), module=True, key_padding=key_padding)
    with torch.no_grad():
        for weights in (False, True):
            t_ours = cuda_time(lambda: ours(x, x, x, key_padding_mask=kpm, need_weights=weights), repeats)
            t_ref = cuda_time(lambda: ref(x, x, x, key_padding_mask=kpm, need_weights=weights), repeats)
            row[f"need_weights={weights}"] = dict(fusedattn=t_ours, torch=t_ref, ratio=t_ref / t_ours)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 512 to 16k)")
    ap.add_argument("--dtypes", nargs="+", choices=["bf16", "fp16"], help="default both")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA GPU")
    if not fusedattn._C._cuda_kernels_built():
        sys.exit("this fusedattn build has no CUDA kernels (built without a CUDA toolkit)")
    torch.backends.cuda.matmul.allow_tf32 = True
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16]
    if args.dtypes:
        dtypes = [dict(bf16=torch.bfloat16, fp16=torch.float16)[d] for d in args.dtypes]
    dims = [128] if args.quick else [64, 128]
    lens = [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    lens = args.lengths or lens
    cases = [(d, E, L, c, var) for var in ("plain", "key_padding", "float_mask") for d in dtypes
             for E in dims for L in lens for c in (False, True)
             if not (var == "float_mask" and L > 4096)]  # the (B, H, L, S) mask alone: 4 GiB at 8k
    progress = progress_bar(len(cases) + 2 * len(dtypes))
    rows = []
    for d, E, L, c, var in cases:
        rows.append(attention_case(d, E, L, c, var, args.repeats, with_math=L <= 2048))
        advance(progress, f"{var} {d} E={E} L={L} causal={c}")
        torch.cuda.empty_cache()
    for d in dtypes:
        for kp in (False, True):
            rows.append(module_case(d, kp, args.repeats))
            advance(progress, f"module {d} key_padding={kp}")
    progress.close()
    gpu = torch.cuda.get_device_name()
    print(f"\n{gpu}, torch {torch.__version__}; TFLOP/s (ratio = fastest PyTorch backend's time / "
          "fusedattn's; default: fusedattn's default route, fused: its own kernel)")
    head = f"{'variant':<12}{'dtype':<10}{'E':>4}{'L':>7}{'causal':>7}  {'default':>8}{'fused':>7}" + "".join(
        f"{n:>10}" for n in BACKENDS) + f"{'ratio':>8}{'fused':>7}"
    print(head)
    for r in rows:
        if r.get("module"):
            continue
        tf = r["tflops"]
        cells = "".join(f"{tf[n]:10.1f}" if n in tf else f"{'-':>10}" for n in BACKENDS)
        ratio = f"{r['ratio']:8.2f}" if r["ratio"] else f"{'-':>8}"
        ratio_fused = f"{r['ratio_fused']:7.2f}" if r["ratio_fused"] else f"{'-':>7}"
        print(f"{r['variant']:<12}{r['dtype']:<10}{r['E']:>4}{r['L']:>7}{str(r['causal']):>7}  "
              f"{tf.get('fusedattn', float('nan')):8.1f}{tf.get('fusedattn_fused', float('nan')):7.1f}"
              f"{cells}{ratio}{ratio_fused}")
    print("\nMultiheadAttention N=32 L=128 E=512 H=8, forward (ms; ratio = torch / fusedattn)")
    for r in rows:
        if r.get("module"):
            for w in (False, True):
                m = r[f"need_weights={w}"]
                print(f"  {r['dtype']:<9} key_padding={str(r['key_padding']):<6} need_weights={str(w):<6}"
                      f" fusedattn {m['fusedattn']:.3f}  torch {m['torch']:.3f}  ratio {m['ratio']:.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_cuda.json")
    with open(path, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, rows=rows), f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

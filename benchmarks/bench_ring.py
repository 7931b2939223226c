"""Ring attention (fusedattn.distributed) on this machine: time per forward+backward step and
the peak memory per rank for W = 1, 2, 4 gloo ranks (one thread each) at a fixed global
sequence length, causal, zigzag layout. On 2 cores more ranks share the same cores, so this
shows the method's overhead and its memory per rank (which should fall as L / W), not a
speed-up. Writes benchmarks/results/ring.json.

  python benchmarks/bench_ring.py [--length 8192] [--ranks 1,2,4]
"""
import argparse
import json
import os
import re
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cpu_model  # noqa: E402

import fusedattn  # noqa: E402,F401
import fusedattn.distributed as fd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def worker(rank, world, port, length, heads, head_dim, repeats, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = length // world
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, heads, n, head_dim, generator=g)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_mb("VmRSS")
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        out = fd.ring_attention(q, k, v, layout="zigzag", is_causal=True)
        out.backward(dout)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    peak = _rss_mb("VmHWM") - base
    peaks = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(peaks, torch.tensor([peak]))
    if rank == 0:
        queue.put((sorted(times)[len(times) // 2], max(p.item() for p in peaks)))
    dist.barrier()
    dist.destroy_process_group()


def run(world, length, heads, head_dim, repeats):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, length, heads, head_dim, repeats, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    import queue as queue_module
    deadline = time.time() + 1800
    while True:  # a rank that fails ends the run instead of leaving it waiting
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) or time.time() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"bench_ring: a rank failed or timed out (W = {world})")
    for p in procs:
        p.join(timeout=120)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ring.json"))
    args = ap.parse_args()
    rows = []
    for w in (int(x) for x in args.ranks.split(",")):
        t, peak = run(w, args.length, args.heads, args.head_dim, args.repeats)
        # Per step each rank sends its K and V shard W - 1 times forward, and K, V, dK, dV
        # (dK, dV in fp32) around again in the backward: bytes per rank per step.
        n = args.length // w
        shard = args.heads * n * args.head_dim * 4
        comm = (w - 1) * 2 * shard + (w - 1) * 2 * shard + w * 2 * shard if w > 1 else 0
        rows.append(dict(ranks=w, step_s=t, peak_mb_per_rank=peak, sent_mb_per_rank=comm / 2**20))
        print(f"W={w}: fwd+bwd {t:.2f} s, peak extra memory per rank {peak:.0f} MiB, "
              f"sent per rank {comm / 2**20:.0f} MiB")
    print(f"CPU: {cpu_model()}, L = {args.length}, H = {args.heads}, E = {args.head_dim}, "
          "causal, zigzag, one thread per rank")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(cpu=cpu_model(), length=args.length, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

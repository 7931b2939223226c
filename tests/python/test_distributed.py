"""Ring attention (fusedattn.distributed) against the single-process op on the full sequence:
values and gradients, with 2 and 4 gloo ranks on loopback, spawned by the test and bounded in
time; both layouts, causal or not, key padding (a rank whose whole key shard is padding),
GQA, odd head dims, fp32 and bf16."""
import math
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedattn
import fusedattn.distributed as fd

TIMEOUT_S = 240


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases(world):
    n = 2 * world * 3  # a multiple of 2W: both layouts shard it
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            yield dict(layout=layout, causal=causal, dtype=torch.float32, L=n, H=4, Hk=4, E=16, Ev=16,
                       kpm=None)
    yield dict(layout="zigzag", causal=True, dtype=torch.float32, L=4 * world, H=6, Hk=2, E=13,
               Ev=7, kpm="last_shard")  # GQA, odd dims, a rank's whole key shard padded
    yield dict(layout="contiguous", causal=False, dtype=torch.float32, L=2 * world * 5, H=2, Hk=2,
               E=8, Ev=8, kpm="random")
    yield dict(layout="zigzag", causal=True, dtype=torch.bfloat16, L=2 * world * 8, H=4, Hk=4,
               E=32, Ev=32, kpm=None)


def _worker(rank, world, port, errfile):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        for case in _cases(world):
            _run_case(rank, world, **case)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent through the file
        with open(errfile, "a") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}\n")
        raise


def _run_case(rank, world, layout, causal, dtype, L, H, Hk, E, Ev, kpm):
    g = torch.Generator().manual_seed(L * 31 + H)
    B = 2
    q = torch.randn(B, H, L, E, generator=g).to(dtype)
    k = torch.randn(B, Hk, L, E, generator=g).to(dtype)
    v = torch.randn(B, Hk, L, Ev, generator=g).to(dtype)
    dout = torch.randn(B, H, L, Ev, generator=g).to(dtype)
    mask = None
    if kpm == "random":
        mask = torch.rand(B, L, generator=g) < 0.3
    elif kpm == "last_shard":  # every position that the last rank holds is padding
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask = fd.unshard(torch.full_like(fd.shard(mask, 1, layout), rank == world - 1), 1, layout)
    gqa = H != Hk
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fusedattn.attention(*full, is_causal=causal, key_padding_mask=mask, enable_gqa=gqa)
    ref.backward(dout)
    local = [fd.shard(t, 2, layout).detach().requires_grad_() for t in (q, k, v)]
    lmask = None if mask is None else fd.shard(mask, 1, layout)
    out, lse = fd.ring_attention(*local, layout=layout, is_causal=causal, key_padding_mask=lmask,
                                 enable_gqa=gqa, return_lse=True)
    out.backward(fd.shard(dout, 2, layout))
    got = fd.unshard(out.detach(), 2, layout)
    grads = [fd.unshard(t.grad, 2, layout) for t in local]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    what = f"{layout} causal={causal} {dtype} kpm={kpm} GQA={gqa}"
    torch.testing.assert_close(got, ref.detach(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")
    for name, a, b in zip("qkv", grads, full):
        torch.testing.assert_close(a, b.grad, atol=tol * 4, rtol=tol,
                                   msg=lambda m: f"{what} d{name}: {m}")
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_single_process(world):
    with tempfile.TemporaryDirectory() as d:
        errfile = os.path.join(d, "errors.txt")
        ctx = mp.start_processes(_worker, args=(world, _free_port(), errfile), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.time() + TIMEOUT_S
        try:
            while not ctx.join(timeout=5):
                if time.time() > deadline:
                    pytest.fail(f"ring attention with {world} ranks did not finish in {TIMEOUT_S} s")
        except mp.ProcessRaisedException as e:
            detail = open(errfile).read() if os.path.exists(errfile) else str(e)
            pytest.fail(detail)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


def test_needs_an_initialised_group_and_checks_arguments():
    q = torch.randn(1, 2, 4, 8)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            fd.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="layout"):
        fd.ring_attention(q, q, q, layout="striped")

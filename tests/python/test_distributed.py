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


def _leave(dist):
    """Every rank done before any tears gloo down (a rank aborted once, SIGABRT from
    std::terminate, in a full run on 2 loaded cores: a peer leaving with work in flight is the
    likely cause; not reproduced in isolation)."""
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank, world, port, errfile):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        for case in _cases(world):
            _run_case(rank, world, **case)
        _leave(dist)
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


def _spawn(worker, world, *args):
    """Runs worker(rank, world, port, errfile, *args) on `world` spawned ranks, bounded by
    TIMEOUT_S; a rank's exception fails the test with its traceback."""
    with tempfile.TemporaryDirectory() as d:
        errfile = os.path.join(d, "errors.txt")
        ctx = mp.start_processes(worker, args=(world, _free_port(), errfile, *[a or d for a in args]),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.time() + TIMEOUT_S
        try:
            while not ctx.join(timeout=5):
                if time.time() > deadline:
                    pytest.fail(f"{world} ranks did not finish in {TIMEOUT_S} s")
        except mp.ProcessRaisedException as e:
            detail = open(errfile).read() if os.path.exists(errfile) else str(e)
            pytest.fail(detail)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_single_process(world):
    _spawn(_worker, world)


def test_needs_an_initialised_group_and_checks_arguments():
    q = torch.randn(1, 2, 4, 8)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            fd.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="layout"):
        fd.ring_attention(q, q, q, layout="striped")


# ---------------------------------------------------------------- models across ranks


class TinyLM(torch.nn.Module):
    """Decoder-only, pre-norm, fusedattn.MultiheadAttention (dropout 0)."""

    def __init__(self, vocab=17, d=24, heads=3, layers=2, max_len=64):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(max_len, d)
        self.attn = torch.nn.ModuleList(fusedattn.MultiheadAttention(d, heads, batch_first=True)
                                        for _ in range(layers))
        self.ff = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(),
                                                          torch.nn.Linear(2 * d, d))
                                      for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, tokens, positions, pad=None):
        x = self.tok(tokens) + self.pos(positions)
        for attn, ff in zip(self.attn, self.ff):
            x = x + attn(x, x, x, is_causal=True, key_padding_mask=pad, need_weights=False)[0]
            x = x + ff(x)
        return self.head(self.norm(x))


def _data(step, B=4, L=16):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 17, (B, L + 1), generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 11:] = True  # trailing padding in one sequence
    return tokens[:, :-1], tokens[:, 1:], pad


def _loss_sum(model, tokens, targets, positions, pad):
    logits = model(tokens, positions, pad)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             reduction="none")
    return (loss * (~pad).flatten()).sum()


def _train_single(steps=3):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        tokens, targets, pad = _data(step)
        count = (~pad).sum()
        loss = _loss_sum(model, tokens, targets, torch.arange(tokens.shape[1]).expand_as(tokens), pad) / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def _train_worker(rank, world, port, errfile, ckpt_dir):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        ref, ref_losses = _train_single()
        _context_parallel_training(rank, world, ref, ref_losses)
        _ddp_training(rank, world, ref, ref_losses)
        _fsdp2_training_and_checkpoint(rank, world, ref, ref_losses, os.path.join(ckpt_dir, "ckpt"))
        _leave(dist)
    except Exception:  # noqa: BLE001
        with open(errfile, "a") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}\n")
        raise


def _assert_same_model(a, b, what):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach(),
                                   q.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def _context_parallel_training(rank, world, ref, ref_losses):
    # The sequences split across the ranks (zigzag), the model code unchanged: step for step
    # the same losses and parameters as one process on the whole sequences.
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    layout = "zigzag"
    for step, want in enumerate(ref_losses):
        tokens, targets, pad = _data(step)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        count = (~pad).sum()
        local = [fd.shard(t, 1, layout) for t in (tokens, targets, positions, pad)]
        with fd.context_parallel(layout=layout):
            loss = _loss_sum(model, *local) / count
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # each rank holds part of every gradient: the sum
            dist.all_reduce(p.grad)
        total = loss.detach().clone()
        dist.all_reduce(total)
        opt.step()
        assert abs(total.item() - want) < 1e-5, (step, total.item(), want)
    _assert_same_model(model, ref, "context parallel")


def _ddp_training(rank, world, ref, ref_losses):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = DDP(TinyLM())
    _data_parallel_steps(model, rank, world, len(ref_losses))
    _assert_same_model(model.module, ref, "DDP")


def _data_parallel_steps(model, rank, world, steps):
    """SGD steps with the global batch's rows split across the ranks; the loss scaled so that
    the gradients' average over ranks (DDP's, FSDP2's) is the global mean's."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        tokens, targets, pad = _data(step)
        count = (~pad).sum()
        rows = slice(rank * tokens.shape[0] // world, (rank + 1) * tokens.shape[0] // world)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        loss = _loss_sum(model, tokens[rows], targets[rows], positions[rows], pad[rows]) * world / count
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fsdp2_training_and_checkpoint(rank, world, ref, ref_losses, ckpt_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torch.distributed.checkpoint as dcp
    torch.manual_seed(0)
    model = TinyLM()
    mesh = init_device_mesh("cpu", (world,))
    for attn in model.attn:
        fully_shard(attn, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _data_parallel_steps(model, rank, world, len(ref_losses))
    _assert_same_model(model, ref, "FSDP2")
    # torch.distributed.checkpoint: save the sharded state, load it into a fresh sharded model.
    dcp.save({"model": model.state_dict()}, checkpoint_id=ckpt_dir)
    torch.manual_seed(1)
    fresh = TinyLM()
    for attn in fresh.attn:
        fully_shard(attn, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    state = {"model": fresh.state_dict()}
    dcp.load(state, checkpoint_id=ckpt_dir)
    fresh.load_state_dict(state["model"])
    _assert_same_model(fresh, ref, "DCP round trip")


def test_models_train_context_parallel_ddp_and_fsdp2_like_one_process():
    _spawn(_train_worker, 2, None)  # None: a fresh temporary folder (the checkpoint's)

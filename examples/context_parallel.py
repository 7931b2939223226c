"""Context parallelism on the CPU: a decoder-only Transformer of fusedattn.MultiheadAttention
trained with each sequence split across 4 gloo ranks (zigzag layout: ring attention between
the shards, under fusedattn.distributed.context_parallel, the model code unchanged), checked
step for step against the same model trained in one process.

    python examples/context_parallel.py [--ranks 4] [--steps 5] [--length 256]
"""
import argparse
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fusedattn
import fusedattn.distributed as fd


class Decoder(nn.Module):
    def __init__(self, vocab=64, d=64, heads=4, layers=2, max_len=4096):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.attn = nn.ModuleList(fusedattn.MultiheadAttention(d, heads, batch_first=True)
                                  for _ in range(layers))
        self.norm1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ff = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(),
                                              nn.Linear(4 * d, d)) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens, positions):
        x = self.tok(tokens) + self.pos(positions)
        for attn, norm, ff in zip(self.attn, self.norm1, self.ff):
            h = norm(x)
            x = x + attn(h, h, h, is_causal=True, need_weights=False)[0]
            x = x + ff(x)
        return self.head(x)


def batch(step, length, batch_size=2, vocab=64):
    """A copy task with a period: token t+1 repeats token t+1-period (learnable causally)."""
    g = torch.Generator().manual_seed(step)
    period = 7
    seed = torch.randint(0, vocab, (batch_size, period), generator=g)
    seq = seed.repeat(1, (length + 1) // period + 1)[:, : length + 1]
    return seq[:, :-1], seq[:, 1:]


def step_loss(model, tokens, targets, positions, count):
    logits = model(tokens, positions)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / count


def train(steps, length, rank=None, world=1, layout="zigzag"):
    torch.manual_seed(0)
    model = Decoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # plain SGD: equal steps give equal weights
    losses, times = [], []
    for s in range(steps):
        tokens, targets = batch(s, length)
        positions = torch.arange(length).expand_as(tokens)
        count = tokens.numel()
        t0 = time.perf_counter()
        if world == 1:
            loss = step_loss(model, tokens, targets, positions, count)
        else:
            local = [fd.shard(t, 1, layout) for t in (tokens, targets, positions)]
            with fd.context_parallel(layout=layout):
                loss = step_loss(model, *local, count)
        opt.zero_grad()
        loss.backward()
        if world > 1:  # every rank holds a part of every gradient (and of the loss)
            for p in model.parameters():
                dist.all_reduce(p.grad)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return model, losses, times


def worker(rank, world, port, steps, length, queue, state_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, losses, times = train(steps, length, rank, world)
    if rank == 0:
        torch.save(model.state_dict(), state_path)  # tensors by file, not through the queue
        queue.put((losses, sorted(times)[len(times) // 2]))
    dist.barrier()
    dist.destroy_process_group()


def run(ranks=4, steps=5, length=256):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    state_path = os.path.join(tempfile.mkdtemp(), "state.pt")
    procs = [ctx.Process(target=worker, args=(r, ranks, port, steps, length, queue, state_path))
             for r in range(ranks)]
    for p in procs:
        p.start()
    cp_losses, cp_time = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"a rank failed (exit code {p.exitcode})")
    cp_state = torch.load(state_path)
    torch.set_num_threads(1)
    model, losses, times = train(steps, length)
    diff = max((cp_state[k] - v).abs().max().item() for k, v in model.state_dict().items())
    return {"losses": losses, "cp_losses": cp_losses, "max_param_diff": diff,
            "step_s": sorted(times)[len(times) // 2], "cp_step_s": cp_time}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args(argv)
    r = run(args.ranks, args.steps, args.length)
    for i, (a, b) in enumerate(zip(r["losses"], r["cp_losses"])):
        print(f"step {i}: loss one process {a:.6f}, {args.ranks} ranks {b:.6f}")
    print(f"largest parameter difference after {args.steps} steps: {r['max_param_diff']:.2e}")
    print(f"median step: one process {r['step_s'] * 1e3:.0f} ms, {args.ranks} gloo ranks "
          f"{r['cp_step_s'] * 1e3:.0f} ms (one thread each, on this machine's cores)")
    return r


if __name__ == "__main__":
    main()

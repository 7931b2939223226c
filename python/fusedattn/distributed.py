"""Context parallelism on torch.distributed: ring attention over sequence shards.

Each rank holds a shard of the sequence dimension of query, key and value. The key/value
shards travel around the ring of ranks by point-to-point messages (``batch_isend_irecv``,
posted before the block they overlap is computed); each rank attends its queries to every
shard with fusedattn's fused op and merges the partial results by their log-sum-exp. The
backward passes the key/value shards around again with their gradient accumulators, which
return to their owners; each block's gradients come from fusedattn's fused backward given the
merged output and log-sum-exp (so P = exp(s - lse) is the block of the whole softmax).

Layouts of a sequence of W * n positions (W ranks; ``shard``/``unshard`` convert):
- ``"contiguous"``: rank r holds positions [r n, (r + 1) n).
- ``"zigzag"``: the sequence in 2W equal chunks, rank r holds chunks r and 2W - 1 - r
  (concatenated), which balances causal work across ranks.
With ``is_causal`` the alignment is the whole sequence's (top-left, L = S); blocks entirely
in the future are neither computed nor waited for beyond passing them on.
"""
import contextlib

import torch
import torch.distributed as dist

__all__ = ["ring_attention", "shard", "unshard", "context_parallel", "current_context"]

# The model-level switch: while set (context_parallel), fusedattn.MultiheadAttention runs its
# attention as ring attention over this group, on inputs that are this rank's shards.
_CONTEXT = {"group": None, "layout": None}

_LAYOUTS = ("contiguous", "zigzag")


def _world(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _chunks(rank, world, layout):
    """Global chunk indices a rank holds, in order, and how many chunks the sequence has."""
    if layout == "contiguous":
        return [rank], world
    return [rank, 2 * world - 1 - rank], 2 * world


def _check_layout(layout):
    if layout not in _LAYOUTS:
        raise ValueError(f"ring_attention: layout must be one of {_LAYOUTS}, got {layout!r}")


def shard(x, dim, layout="contiguous", group=None):
    """This rank's shard of a full tensor along ``dim`` (the sequence dim)."""
    _check_layout(layout)
    world, rank = _world(group)
    ids, n = _chunks(rank, world, layout)
    if x.shape[dim] % n != 0:
        raise ValueError(f"shard: the sequence length {x.shape[dim]} must be a multiple of "
                         f"{n} ({layout} over {world} ranks)")
    parts = x.chunk(n, dim)
    return torch.cat([parts[i] for i in ids], dim)


def unshard(x, dim, layout="contiguous", group=None):
    """The full tensor from every rank's shard (an all_gather), in sequence order."""
    _check_layout(layout)
    world, rank = _world(group)
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    per_rank = len(_chunks(0, world, layout)[0])
    _, n = _chunks(0, world, layout)
    pieces = [None] * n
    for r, t in enumerate(gathered):
        for i, c in zip(_chunks(r, world, layout)[0], t.chunk(per_rank, dim)):
            pieces[i] = c
    return torch.cat(pieces, dim)


def _merge(out, lse, block_out, block_lse):
    """Combines two partial attentions over disjoint keys: out in fp32, lse (.., L)."""
    if out is None:
        return block_out.to(lse.dtype), block_lse
    new = torch.logaddexp(lse, block_lse)
    # Rows that see nothing in either part keep lse -inf and output 0 (no NaN from inf - inf).
    safe = torch.where(new == float("-inf"), torch.zeros_like(new), new)
    a = torch.exp(lse - safe).unsqueeze(-1)
    b = torch.exp(block_lse - safe).unsqueeze(-1)
    return out * a + block_out.to(out.dtype) * b, new


def _relation(qi, kj, causal):
    """How query chunk qi sees key chunk kj: 'full', 'causal' (the diagonal) or None."""
    if not causal or qi > kj:
        return "full"
    return "causal" if qi == kj else None


class _Ring:
    """One exchange step: sends this rank's buffers to the next rank and receives the
    previous rank's, asynchronously."""

    def __init__(self, group):
        self.group = group
        world, rank = _world(group)
        self.next = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
        self.prev = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world

    def start(self, tensors):
        tensors = [t.contiguous() for t in tensors]  # the messages are whole, dense buffers
        received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        ops = []
        for t, r in zip(tensors, received):
            ops.append(dist.P2POp(dist.isend, t, self.next, self.group))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group))
        reqs = dist.batch_isend_irecv(ops)
        return reqs, received, tensors  # the sent buffers stay alive until the wait


def _wait(pending):
    reqs, received, _ = pending
    for r in reqs:
        r.wait()
    return received


def _blocks(rank, src, world, layout, causal, q_len, k_len):
    """The (query slice, key slice, relation) blocks of this rank's queries against the
    shard from rank src, skipping those entirely in the future."""
    qids, _ = _chunks(rank, world, layout)
    kids, _ = _chunks(src, world, layout)
    qn, kn = q_len // len(qids), k_len // len(kids)
    out = []
    for a, qi in enumerate(qids):
        for b, kj in enumerate(kids):
            rel = _relation(qi, kj, causal)
            if rel is not None:
                out.append((slice(a * qn, (a + 1) * qn), slice(b * kn, (b + 1) * kn), rel))
    return out


def _attend_block(q, k, v, kpm, rel, scale, enable_gqa):
    out, _, lse = torch.ops.fusedattn.attention(
        q, k, v, None, 0.0, rel == "causal", scale, enable_gqa, key_padding_mask=kpm,
        return_lse=True)
    return out, lse


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_state(query, value):
    """The merge's starting point: output 0 and lse -inf, in the accumulate type."""
    acc = _acc(query.dtype)
    out = query.new_zeros(query.shape[:-1] + (value.shape[-1],), dtype=acc)
    return out, torch.full(query.shape[:-1], float("-inf"), dtype=acc, device=query.device)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, kpm, group, layout, is_causal, scale, enable_gqa):
        world, rank = _world(group)
        ring = _Ring(group)
        L, S = query.shape[-2], key.shape[-2]
        bufs = [key, value] + ([kpm] if kpm is not None else [])
        out = lse = None
        for step in range(world):
            src = (rank - step) % world
            pending = ring.start(bufs) if step + 1 < world else None
            k, v = bufs[0], bufs[1]
            m = bufs[2] if kpm is not None else None
            for qs, ks, rel in _blocks(rank, src, world, layout, is_causal, L, S):
                o, l_ = _attend_block(query[..., qs, :], k[..., ks, :], v[..., ks, :],
                                      None if m is None else m[..., ks], rel, scale, enable_gqa)
                if out is None:
                    out, lse = _empty_state(query, value)
                o_part, l_part = _merge(out[..., qs, :], lse[..., qs], o, l_)
                out[..., qs, :], lse[..., qs] = o_part, l_part
            if pending is not None:
                bufs = _wait(pending)
        if out is None:  # no block at all (cannot happen: the diagonal is always there)
            out, lse = _empty_state(query, value)
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse, *( [kpm] if kpm is not None else []))
        ctx.has_kpm = kpm is not None
        ctx.group, ctx.layout, ctx.is_causal, ctx.scale, ctx.enable_gqa = (
            group, layout, is_causal, scale, enable_gqa)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse, *rest = ctx.saved_tensors
        kpm = rest[0] if ctx.has_kpm else None
        group = ctx.group
        world, rank = _world(group)
        ring = _Ring(group)
        L, S = query.shape[-2], key.shape[-2]
        grad_out = grad_out.contiguous()
        acc = _acc(query.dtype)
        dq = torch.zeros_like(query, dtype=acc)
        dk = torch.zeros_like(key, dtype=acc)
        dv = torch.zeros_like(value, dtype=acc)
        bufs = [key, value] + ([kpm] if kpm is not None else [])
        for step in range(world):
            src = (rank - step) % world
            pending = ring.start(bufs) if step + 1 < world else None
            k, v = bufs[0], bufs[1]
            m = bufs[2] if kpm is not None else None
            for qs, ks, rel in _blocks(rank, src, world, ctx.layout, ctx.is_causal, L, S):
                g = torch.ops.fusedattn._attention_backward(
                    grad_out[..., qs, :], None, None, query[..., qs, :].contiguous(),
                    k[..., ks, :].contiguous(), v[..., ks, :].contiguous(),
                    out[..., qs, :].contiguous(), lse[..., qs].contiguous(), None,
                    None if m is None else m[..., ks].contiguous(), None, 0.0,
                    rel == "causal", False, ctx.scale, ctx.enable_gqa, False, False)
                dq[..., qs, :] += g[0].to(acc)
                dk[..., ks, :] += g[1].to(acc)
                dv[..., ks, :] += g[2].to(acc)
            # The accumulators travel with the shard they belong to; after the last step one
            # more hop brings each back to its owner.
            if world > 1:
                dk, dv = _wait(ring.start([dk, dv]))
            if pending is not None:
                bufs = _wait(pending)
        return (dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None, None,
                None, None, None)


def ring_attention(query, key, value, *, group=None, layout="contiguous", is_causal=False,
                   scale=None, key_padding_mask=None, enable_gqa=False, return_lse=False):
    """Attention over a sequence sharded across the ranks of ``group`` (default: the world).

    query ``(B, H, L_local, E)``, key/value ``(B, Hk, S_local, E|Ev)``, key_padding_mask
    ``(B, S_local)`` bool (True = padding): this rank's shards in ``layout``. Returns this
    rank's shard of the output (and of the lse, fp32, with ``return_lse``); gradients flow to
    the local shards. A query whose keys are all padding or in the future gives 0."""
    _check_layout(layout)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention: torch.distributed is not initialised "
                           "(dist.init_process_group first)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("ring_attention: query, key and value must be 4-D (B, H, L_local, E)")
    if is_causal and query.shape[-2] != key.shape[-2]:
        raise ValueError("ring_attention: is_causal needs query and key shards of the same length")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (key.shape[0], key.shape[-2]):
            raise ValueError(f"ring_attention: key_padding_mask must be bool (B, S_local) = "
                             f"({key.shape[0]}, {key.shape[-2]}), got {key_padding_mask.dtype} "
                             f"{tuple(key_padding_mask.shape)}")
    if layout == "zigzag" and (query.shape[-2] % 2 or key.shape[-2] % 2):
        raise ValueError("ring_attention: with layout='zigzag' the shards hold two equal chunks "
                         "(even lengths)")
    out, lse = _RingAttention.apply(query, key, value, key_padding_mask, group, layout,
                                    is_causal, scale, enable_gqa)
    return (out, lse) if return_lse else out


@contextlib.contextmanager
def context_parallel(group=None, layout="contiguous"):
    """Within this block every ``fusedattn.MultiheadAttention`` attends over the sequence
    sharded across ``group`` (default: the world): its query/key/value inputs are this rank's
    shards in ``layout`` (self-attention, or cross-attention whose memory is sharded the same
    way), its projections run on them as they are, and the attention between them is
    ``ring_attention``. A model built from the modules runs context-parallel without a change
    to its code; positions (embeddings) must be the shards' global ones (``shard`` them too).
    Returned weights, attn_mask and dropout are not available inside (each is an error)."""
    _check_layout(layout)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel: torch.distributed is not initialised")
    before = dict(_CONTEXT)
    _CONTEXT.update(group=group, layout=layout)
    try:
        yield
    finally:
        _CONTEXT.update(before)


def current_context():
    """(group, layout) while ``context_parallel`` is active, else None."""
    return None if _CONTEXT["layout"] is None else (_CONTEXT["group"], _CONTEXT["layout"])


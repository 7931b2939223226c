"""fusedattn's flagship demo: an encoder-decoder Transformer built from fusedattn modules learns
to sort sequences of digits, on the CPU, in about two minutes.

The encoder's self-attention, the decoder's causal self-attention and the cross-attention
between them are fusedattn.MultiheadAttention. The same model built from
torch.nn.MultiheadAttention (same weights) is timed on the same batches in the same run.
Decoding runs on fusedattn.KVCache: each decoder self-attention appends the new token's keys
and values to its cache and attends to every cached position, and the cross-attention reads
the encoder's keys and values from mha.memory_cache (projected once). Greedy decoding and beam
search (width 4, the caches reordered with KVCache.reorder as beams are kept or dropped) are
both evaluated.

    python examples/demo.py [--steps 1500] [--batch 128] [--max-len 12]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedattn
from common import median, steps_bar

PAD, BOS, FIRST_DIGIT, DIGITS = 0, 1, 2, 10
VOCAB = FIRST_DIGIT + DIGITS


def make_batch(n, max_len, gen):
    """Source: random digits with random lengths, right-padded. Target: the same digits sorted.
    Returns (src, src_pad, tgt_in, tgt_out) with src_pad True at padding; tgt_in is BOS then
    the target shifted right; tgt_out has PAD (ignored by the loss) past each length."""
    lengths = torch.randint(2, max_len + 1, (n,), generator=gen)
    pad = torch.arange(max_len)[None, :] >= lengths[:, None]
    src = torch.randint(FIRST_DIGIT, VOCAB, (n, max_len), generator=gen).masked_fill(pad, PAD)
    # Padding sorts last when it is given a key above every digit.
    tgt = src.masked_fill(pad, VOCAB).sort(dim=1).values.masked_fill(pad, PAD)
    tgt_in = torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], dim=1)
    return src, pad, tgt_in, tgt


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ff, dropout, mha):
        super().__init__()
        self.attn = mha(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, pad):
        y = self.norm1(x)
        x = x + self.drop(self.attn(y, y, y, key_padding_mask=pad, need_weights=False)[0])
        return x + self.drop(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d, heads, ff, dropout, mha):
        super().__init__()
        self.self_attn = mha(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = mha(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, memory_pad, causal_mask):
        y = self.norm1(x)
        # fusedattn applies is_causal by itself (causal_mask is None); torch's module needs the
        # mask as well as the flag.
        x = x + self.drop(self.self_attn(y, y, y, attn_mask=causal_mask, is_causal=True,
                                         need_weights=False)[0])
        y = self.norm2(x)
        x = x + self.drop(self.cross_attn(y, memory, memory, key_padding_mask=memory_pad,
                                          need_weights=False)[0])
        return x + self.drop(self.ff(self.norm3(x)))


class Seq2Seq(nn.Module):
    """Pre-norm encoder-decoder Transformer; `mha` is the attention module class."""

    def __init__(self, mha=fusedattn.MultiheadAttention, d=64, heads=4, ff=256, layers=2,
                 dropout=0.0, max_len=64):
        super().__init__()
        self.explicit_causal_mask = mha is not fusedattn.MultiheadAttention
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.encoder = nn.ModuleList(EncoderLayer(d, heads, ff, dropout, mha) for _ in range(layers))
        self.decoder = nn.ModuleList(DecoderLayer(d, heads, ff, dropout, mha) for _ in range(layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def encode(self, src, src_pad):
        x = self.embed(src) + self.pos[: src.shape[1]]
        for layer in self.encoder:
            x = layer(x, src_pad)
        return self.enc_norm(x)

    def forward(self, src, src_pad, tgt_in):
        memory = self.encode(src, src_pad)
        T = tgt_in.shape[1]
        mask = (torch.ones(T, T, dtype=torch.bool).triu(1) if self.explicit_causal_mask else None)
        x = self.embed(tgt_in) + self.pos[:T]
        for layer in self.decoder:
            x = layer(x, memory, src_pad, mask)
        return self.head(self.dec_norm(x))


def decode_step(model, token, t, caches, memories):
    """One decoding step: token (B, 1) at position t through every decoder layer, each with
    its self-attention KVCache (appended to) and its cross-attention memory cache. -> logits
    (B, VOCAB)."""
    x = model.embed(token) + model.pos[t:t + 1]
    for layer, cache, memory in zip(model.decoder, caches, memories):
        y = layer.norm1(x)
        x = x + layer.self_attn(y, y, y, cache=cache, is_causal=True, need_weights=False)[0]
        y = layer.norm2(x)
        x = x + layer.cross_attn(y, None, None, cache=memory, need_weights=False)[0]
        x = x + layer.ff(layer.norm3(x))
    return model.head(model.dec_norm(x))[:, 0]


def start_decoding(model, src, src_pad, steps, beams=1, cache_dtype=None):
    """The decoder's caches for src (each sentence repeated `beams` times): per layer an
    empty self-attention KVCache and the cross-attention's memory cache, stored in cache_dtype
    (default the model's; torch.int8 stores a quarter of fp32's bytes)."""
    memory = model.encode(src, src_pad)
    rows = torch.arange(src.shape[0]).repeat_interleave(beams)
    caches, memories = [], []
    for layer in model.decoder:
        caches.append(layer.self_attn.kv_cache(len(rows), steps, cache_dtype=cache_dtype))
        m = layer.cross_attn.memory_cache(memory, src_pad, cache_dtype=cache_dtype)
        if beams > 1:
            m.reorder(rows)  # a read-only cache: gathered, one row per beam
        memories.append(m)
    return caches, memories


@torch.no_grad()
def greedy_decode(model, src, src_pad, steps, return_logits=False, cache_dtype=None):
    """Greedy decoding through the KV caches (stored in cache_dtype). Returns (N, steps)
    tokens, and (N, steps, VOCAB) logits with return_logits."""
    model.eval()
    caches, memories = start_decoding(model, src, src_pad, steps, cache_dtype=cache_dtype)
    token = torch.full((src.shape[0], 1), BOS)
    decoded, logits = [], []
    for t in range(steps):
        logits.append(decode_step(model, token, t, caches, memories))
        token = logits[-1].argmax(-1, keepdim=True)
        decoded.append(token)
    decoded = torch.cat(decoded, 1)
    return (decoded, torch.stack(logits, 1)) if return_logits else decoded


@torch.no_grad()
def beam_search(model, src, src_pad, steps, width=4):
    """Beam search of `width` beams per sentence, every sequence `steps` tokens long (the
    task's output has the input's length). Each step scores width x VOCAB continuations per
    sentence, keeps the best `width`, and reorders the self-attention caches to the kept beams'
    parents (KVCache.reorder). Returns ((N, steps) best tokens, (N,) their log-probabilities)."""
    model.eval()
    N = src.shape[0]
    caches, memories = start_decoding(model, src, src_pad, steps, beams=width)
    token = torch.full((N * width, 1), BOS)
    score = torch.full((N, width), -float("inf"))
    score[:, 0] = 0.0  # all beams start equal: keep one, or the first step picks duplicates
    history = torch.zeros(N * width, 0, dtype=torch.long)
    for t in range(steps):
        logp = decode_step(model, token, t, caches, memories).log_softmax(-1)  # (N * W, V)
        total = (score.reshape(-1, 1) + logp).reshape(N, width * VOCAB)
        score, best = total.topk(width, dim=-1)  # (N, W), sorted
        parent = (torch.arange(N).unsqueeze(1) * width + best // VOCAB).reshape(-1)
        token = (best % VOCAB).reshape(-1, 1)
        for cache in caches:
            cache.reorder(parent)
        history = torch.cat([history[parent], token], 1)
    return history.reshape(N, width, steps)[:, 0], score[:, 0]


def torch_twin(model):
    """The same model with torch.nn.MultiheadAttention in place of fusedattn's (same weights)."""
    twin = Seq2Seq(nn.MultiheadAttention, d=model.embed.embedding_dim,
                   heads=model.encoder[0].attn.num_heads, ff=model.encoder[0].ff[0].out_features,
                   layers=len(model.encoder), max_len=model.pos.shape[0])
    twin.load_state_dict(model.state_dict())
    return twin


def train(steps=1500, batch=128, max_len=12, lr=2e-3, seed=0, timing_every=10, quiet=False):
    """Trains the fusedattn model. Every `timing_every` steps the torch twin (a copy made at the
    first such step, trained only on those batches) takes one timed step on the same batch,
    right after the fusedattn model's. Returns (model, stats)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = Seq2Seq()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    twin, twin_opt = None, None
    times = {"fusedattn": [], "torch": []}

    def step_of(m, o, batch_data):
        src, pad, tgt_in, tgt_out = batch_data
        start = time.perf_counter()
        logits = m(src, pad, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        o.zero_grad()
        loss.backward()
        o.step()
        return loss.item(), time.perf_counter() - start

    model.train()
    bar = steps_bar(steps, quiet)
    for step in bar:
        data = make_batch(batch, max_len, gen)
        loss, dt = step_of(model, opt, data)
        sched.step()
        times["fusedattn"].append(dt)
        if step % timing_every == 0:
            if twin is None:
                twin = torch_twin(model).train()
                twin_opt = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=0.01)
                step_of(twin, twin_opt, data)  # warm-up, not timed
            times["torch"].append(step_of(twin, twin_opt, data)[1])
        if not quiet and (step % 10 == 0 or step == steps):
            bar.set_postfix_str(f"loss {loss:.4f}")
    return model, {"time_ms": {k: median(v) * 1e3 for k, v in times.items()}}


def evaluate(model, n=1000, max_len=12, seed=123, beam_width=4):
    """Sequence and token accuracy of greedy and of beam-search decoding on fresh data."""
    gen = torch.Generator().manual_seed(seed)
    src, pad, tgt_in, tgt_out = make_batch(n, max_len, gen)

    def accuracy(pred):
        pred = pred.masked_fill(pad, PAD)
        seq_acc = ((pred == tgt_out) | pad).all(1).float().mean().item()
        tok_acc = ((pred == tgt_out) & ~pad).sum().item() / (~pad).sum().item()
        return seq_acc, tok_acc, pred

    greedy = greedy_decode(model, src, pad, max_len)
    seq_acc, tok_acc, pred = accuracy(greedy)
    # The same decoding with int8 caches: its accuracy, and its tokens against the full cache's.
    greedy_int8 = greedy_decode(model, src, pad, max_len, cache_dtype=torch.int8)
    int8_seq, int8_tok, _ = accuracy(greedy_int8)
    same = ((greedy_int8 == greedy) & ~pad).sum().item() / (~pad).sum().item()
    beam_seq, beam_tok, _ = accuracy(beam_search(model, src, pad, max_len, beam_width)[0])
    return {"sequence_accuracy": seq_acc, "token_accuracy": tok_acc,
            "int8_cache_sequence_accuracy": int8_seq, "int8_cache_token_accuracy": int8_tok,
            "int8_cache_same_tokens": same,
            "beam_sequence_accuracy": beam_seq, "beam_token_accuracy": beam_tok,
            "beam_width": beam_width, "examples": (src, pad, pred)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=12)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model, stats = train(args.steps, args.batch, args.max_len)
    elapsed = time.perf_counter() - start
    result = evaluate(model, max_len=args.max_len)
    t = stats["time_ms"]
    print(f"trained {args.steps} steps in {elapsed:.0f} s")
    print(f"greedy decoding (fusedattn.KVCache), 1000 fresh sequences: "
          f"{result['sequence_accuracy']:.1%} sorted exactly, {result['token_accuracy']:.1%} of tokens")
    print(f"the same with int8 caches (a quarter of the bytes): "
          f"{result['int8_cache_sequence_accuracy']:.1%} sorted exactly, "
          f"{result['int8_cache_token_accuracy']:.1%} of tokens; "
          f"{result['int8_cache_same_tokens']:.1%} of tokens equal to the full cache's")
    print(f"beam search, width {result['beam_width']} (KVCache.reorder): "
          f"{result['beam_sequence_accuracy']:.1%} sorted exactly, "
          f"{result['beam_token_accuracy']:.1%} of tokens")
    print(f"median training step: fusedattn {t['fusedattn']:.1f} ms, "
          f"same model with torch.nn.MultiheadAttention {t['torch']:.1f} ms "
          f"({t['torch'] / t['fusedattn']:.2f}x)")
    src, pad, pred = result["examples"]
    print("examples:")
    for s, p, y in zip(src[:5], pad[:5], pred[:5]):
        digits = lambda row: " ".join(str(v - FIRST_DIGIT) for v in row.tolist())  # noqa: E731
        print(f"  {digits(s[~p]):<24} -> {digits(y[~p])}")
    return result, stats


if __name__ == "__main__":
    main()

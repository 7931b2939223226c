"""Encoder-decoder attention: a GRU encoder and a GRU decoder joined by
cross-attention, where the decoder's outputs are the queries and the encoder's outputs the keys
and values. `--attention multihead` uses fusedattn.MultiheadAttention(128, 8)
(multi-head cross-attention); `--attention dot` uses plain, unscaled dot-product
attention, fusedattn.attention(..., scale=1.0). Both take the source's key padding mask.

Task: reverse sequences of digits (length 3 to 10, padded).

    python examples/gru_seq2seq.py [--steps 800] [--attention multihead|dot]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedattn
from common import fit

PAD, BOS, FIRST_DIGIT, DIGITS, MAX_LEN = 0, 1, 2, 10, 10
VOCAB = FIRST_DIGIT + DIGITS


def make_batch(n, gen):
    lengths = torch.randint(3, MAX_LEN + 1, (n,), generator=gen)
    pad = torch.arange(MAX_LEN)[None, :] >= lengths[:, None]
    src = torch.randint(FIRST_DIGIT, VOCAB, (n, MAX_LEN), generator=gen).masked_fill(pad, PAD)
    # Reverse the valid part of each row: position t takes source position length - 1 - t.
    index = (lengths[:, None] - 1 - torch.arange(MAX_LEN)[None, :]).clamp(min=0)
    tgt = src.gather(1, index).masked_fill(pad, PAD)
    tgt_in = torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], dim=1)
    return src, pad, tgt_in, tgt


class Seq2Seq(nn.Module):
    def __init__(self, attention="multihead", hidden=128, heads=8):
        super().__init__()
        self.attention = attention
        self.embed = nn.Embedding(VOCAB, 64, padding_idx=PAD)
        self.encoder = nn.GRU(64, hidden, batch_first=True)
        self.decoder = nn.GRU(64, hidden, batch_first=True)
        if attention == "multihead":
            self.cross = fusedattn.MultiheadAttention(hidden, heads, batch_first=True)
        self.out = nn.Linear(2 * hidden, VOCAB)

    def attend(self, dec, enc, src_pad):
        """Decoder outputs (N, T, H) attend to encoder outputs (N, S, H)."""
        if self.attention == "multihead":
            return self.cross(dec, enc, enc, key_padding_mask=src_pad, need_weights=False)[0]
        # Dot-product attention: softmax(dec enc^T) enc, no scaling; one head.
        return fusedattn.attention(dec[:, None], enc[:, None], enc[:, None], scale=1.0,
                                   key_padding_mask=src_pad)[:, 0]

    def encode(self, src, src_pad):
        lengths = (~src_pad).sum(1)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(src), lengths, batch_first=True,
                                                   enforce_sorted=False)
        enc, h = self.encoder(packed)
        enc, _ = nn.utils.rnn.pad_packed_sequence(enc, batch_first=True, total_length=src.shape[1])
        return enc, h

    def forward(self, src, src_pad, tgt_in):
        enc, h = self.encode(src, src_pad)
        dec, _ = self.decoder(self.embed(tgt_in), h)
        return self.out(torch.cat([dec, self.attend(dec, enc, src_pad)], -1))

    @torch.no_grad()
    def greedy(self, src, src_pad, steps):
        enc, h = self.encode(src, src_pad)
        token = torch.full((src.shape[0], 1), BOS)
        out = []
        for _ in range(steps):
            dec, h = self.decoder(self.embed(token), h)
            token = self.out(torch.cat([dec, self.attend(dec, enc, src_pad)], -1)).argmax(-1)
            out.append(token)
        return torch.cat(out, 1)


def run(steps=800, batch=64, attention="multihead", seed=0, quiet=False):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = Seq2Seq(attention)

    def batch_loss():
        src, pad, tgt_in, tgt = make_batch(batch, gen)
        logits = model(src, pad, tgt_in)
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)

    start = time.perf_counter()
    fit(model, steps, batch_loss, quiet=quiet)
    model.eval()
    src, pad, _, tgt = make_batch(1000, torch.Generator().manual_seed(seed + 2))
    pred = model.greedy(src, pad, MAX_LEN).masked_fill(pad, PAD)
    return {"sequence_accuracy": (pred == tgt).all(1).float().mean().item(),
            "token_accuracy": ((pred == tgt) & ~pad).sum().item() / (~pad).sum().item(),
            "seconds": time.perf_counter() - start, "examples": (src, pad, pred)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--attention", default="multihead", choices=["multihead", "dot"])
    args = parser.parse_args(argv)
    r = run(args.steps, attention=args.attention)
    print(f"{args.attention} cross-attention: {r['sequence_accuracy']:.1%} of 1000 test sequences "
          f"reversed exactly, {r['token_accuracy']:.1%} of tokens, {r['seconds']:.0f} s")
    src, pad, pred = r["examples"]
    for s, p, y in zip(src[:3], pad[:3], pred[:3]):
        print("  ", [v - FIRST_DIGIT for v in s[~p].tolist()], "->",
              [v - FIRST_DIGIT for v in y[~p].tolist()])
    return r


if __name__ == "__main__":
    main()

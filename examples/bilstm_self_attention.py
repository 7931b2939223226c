"""A text classifier, embedding -> BiLSTM -> fusedattn.SelfAttention ->
dense layers, on synthetic token data with padding (Keras's Masking becomes a key padding mask).

Task: each sequence (length 8 to 64, padded to 64) is filler tokens with one keyword token
somewhere in it; the class is which of the 5 keywords it is. Chance is 20%.

    python examples/bilstm_self_attention.py [--steps 150]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedattn
from common import fit

PAD, NUM_CLASSES, VOCAB, MAX_LEN = 0, 5, 60, 64
KEYWORDS = range(1, 1 + NUM_CLASSES)  # tokens 1..5; filler is 6..VOCAB-1


def make_batch(n, gen):
    lengths = torch.randint(8, MAX_LEN + 1, (n,), generator=gen)
    pad = torch.arange(MAX_LEN)[None, :] >= lengths[:, None]
    tokens = torch.randint(1 + NUM_CLASSES, VOCAB, (n, MAX_LEN), generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    where = (torch.rand(n, generator=gen) * lengths).long()  # a valid position in each row
    tokens[torch.arange(n), where] = labels + KEYWORDS[0]
    return tokens.masked_fill(pad, PAD), pad, labels


class Classifier(nn.Module):
    def __init__(self, embed=32, hidden=64, d_k=128):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed, padding_idx=PAD)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        # Single-head self-attention (output_dim=128) on the BiLSTM's 2*64 features.
        self.attn = fusedattn.SelfAttention(2 * hidden, d_k)
        self.dense = nn.Linear(d_k, 64)
        self.out = nn.Linear(64, NUM_CLASSES)

    def forward(self, tokens, pad, need_weights=False):
        h, _ = self.lstm(self.embed(tokens))
        a, weights = self.attn(h, key_padding_mask=pad, need_weights=need_weights)
        # Keras's Dense on the (N, T, 128) sequence, then a masked mean over valid steps.
        x = F.relu(self.dense(a)).masked_fill(pad[..., None], 0)
        x = x.sum(1) / (~pad).sum(1, keepdim=True)
        return self.out(x), weights


def run(steps=150, batch=64, seed=0, quiet=False):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = Classifier()

    def batch_loss():
        tokens, pad, labels = make_batch(batch, gen)
        return F.cross_entropy(model(tokens, pad)[0], labels)

    start = time.perf_counter()
    fit(model, steps, batch_loss, quiet=quiet)
    model.eval()
    tokens, pad, labels = make_batch(1000, torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        logits, weights = model(tokens, pad, need_weights=True)
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return {"accuracy": accuracy, "seconds": time.perf_counter() - start, "weights": weights,
            "pad": pad}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    r = run(args.steps)
    print(f"test accuracy {r['accuracy']:.1%} (chance 20%) after {args.steps} steps, "
          f"{r['seconds']:.0f} s")
    w, pad = r["weights"], r["pad"]
    print(f"attention rows sum to 1 over valid keys, 0 on padding: "
          f"max padding weight {w.masked_select(pad[:, None, :].expand_as(w)).abs().max():.1e}")
    return r


if __name__ == "__main__":
    main()

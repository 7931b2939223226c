"""Sequence regression with LSTM(64, return_sequences) ->
fusedattn.AttentionPooling(units=32) -> Dense(1), trained on the mean absolute error.

Task: each step of a sequence (length 6 to 20, padded) has two features, a value and a marker;
exactly one step is marked, and the target is the value at that step. The last step (the
pooling layer's query) has to find the marked one. Predicting the mean scores an MAE of ~0.8.

    python examples/lstm_attention_pooling.py [--steps 300] [--score luong|bahdanau]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedattn
from common import fit

MAX_LEN = 20


def make_batch(n, gen):
    lengths = torch.randint(6, MAX_LEN + 1, (n,), generator=gen)
    pad = torch.arange(MAX_LEN)[None, :] >= lengths[:, None]
    values = torch.randn(n, MAX_LEN, generator=gen)
    where = (torch.rand(n, generator=gen) * lengths).long()
    marker = torch.zeros(n, MAX_LEN)
    marker[torch.arange(n), where] = 1.0
    x = torch.stack([values, marker], -1).masked_fill(pad[..., None], 0.0)
    return x, pad, values[torch.arange(n), where][:, None]


class Regressor(nn.Module):
    def __init__(self, score="luong"):
        super().__init__()
        self.lstm = nn.LSTM(2, 64, batch_first=True)
        self.pool = fusedattn.AttentionPooling(64, units=32, score=score)
        self.out = nn.Linear(32, 1)

    def forward(self, x, pad):
        h, _ = self.lstm(x)
        pooled, weights = self.pool(h, key_padding_mask=pad)
        return self.out(pooled), weights


def run(steps=300, batch=64, score="luong", seed=0, quiet=False):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = Regressor(score)

    def batch_loss():
        x, pad, y = make_batch(batch, gen)
        return F.l1_loss(model(x, pad)[0], y)  # Keras's loss='mae'

    start = time.perf_counter()
    fit(model, steps, batch_loss, quiet=quiet, label="MAE")
    model.eval()
    x, pad, y = make_batch(2000, torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        pred, weights = model(x, pad)
    return {"mae": F.l1_loss(pred, y).item(), "baseline_mae": (y - y.mean()).abs().mean().item(),
            "seconds": time.perf_counter() - start, "weights": weights, "x": x}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--score", default="luong", choices=["luong", "bahdanau"])
    args = parser.parse_args(argv)
    r = run(args.steps, score=args.score)
    print(f"test MAE {r['mae']:.3f} (predicting the mean: {r['baseline_mae']:.3f}) "
          f"after {args.steps} steps, {r['seconds']:.0f} s")
    marked = r["x"][..., 1].argmax(1)
    hit = (r["weights"].argmax(1) == marked).float().mean().item()
    print(f"the pooling's largest weight is on the marked step in {hit:.1%} of test sequences")
    return r


if __name__ == "__main__":
    main()

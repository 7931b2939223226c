"""Helpers shared by the examples: a progress bar, a median, a training loop."""
import sys

import torch


def progress(step, total, text="", width=30, stream=sys.stdout):
    """One-line progress bar, redrawn in place; a newline at the last step."""
    done = int(width * step / max(total, 1))
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {text}")
    if step >= total:
        stream.write("\n")
    stream.flush()


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def fit(model, steps, batch_loss, lr=3e-3, quiet=False, label="loss"):
    """Adam on model's parameters for `steps` steps; batch_loss() gives a fresh batch's loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        loss = batch_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not quiet and (step % 10 == 0 or step == steps):
            progress(step, steps, f"{label} {loss.item():.3f}")

"""Helpers shared by the examples: training steps with a progress bar, a median, a training loop."""
import torch
from tqdm import tqdm


def steps_bar(steps, quiet=False):
    """Steps 1..steps under a tqdm bar (none when quiet); set_postfix_str shows the loss."""
    return tqdm(range(1, steps + 1), disable=quiet, leave=True, dynamic_ncols=True)


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def fit(model, steps, batch_loss, lr=3e-3, quiet=False, label="loss"):
    """Adam on model's parameters for `steps` steps; batch_loss() gives a fresh batch's loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    bar = steps_bar(steps, quiet)
    for step in bar:
        loss = batch_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not quiet and (step % 10 == 0 or step == steps):
            bar.set_postfix_str(f"{label} {loss.item():.3f}")

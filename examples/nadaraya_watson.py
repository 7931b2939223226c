"""Nadaraya-Watson kernel regression through fusedattn's Gaussian-kernel attention.

Noisy samples of f(x) = 2 sin(x) + x^0.8 on [0, 5]; the prediction at a query x is the
attention-weighted mean of the training targets, with weights softmax(-(x - x_i)^2 / (2 h^2)).
First with the fixed bandwidth h = 1 (softmax(-(q - k)^2 / 2)), then with h learned
by GaussianKernelAttention (leave-one-out: each training point is predicted from the others).
Writes a PNG with the two fits and the two attention-weight heat maps.

    python examples/nadaraya_watson.py [--out nadaraya_watson.png]
"""
import argparse

import torch

import fusedattn
from common import steps_bar


def f(x):
    return 2 * torch.sin(x) + x ** 0.8


def make_data(n_train=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_train = torch.sort(torch.rand(n_train, generator=gen) * 5).values
    y_train = f(x_train) + torch.normal(0.0, 0.5, (n_train,), generator=gen)
    x_test = torch.arange(0, 5, 0.1)
    return x_train, y_train, x_test


def leave_one_out(x_train, y_train):
    """Keys and values for predicting each training point from the n - 1 others:
    query (n, 1), key and value (n, n - 1)."""
    n = len(x_train)
    others = ~torch.eye(n, dtype=torch.bool)
    return (x_train[:, None], x_train.expand(n, n)[others].view(n, n - 1),
            y_train.expand(n, n)[others].view(n, n - 1))


def run(steps=100, seed=0, quiet=False):
    torch.manual_seed(seed)
    x_train, y_train, x_test = make_data(seed=seed)
    y_true = f(x_test)

    # Fixed bandwidth 1: the function, 1-D points (L), (S), (S).
    fixed, fixed_w = fusedattn.gaussian_kernel_attention(x_test, x_train, y_train, 1.0,
                                                         need_weights=True)

    # Learned bandwidth: the module; batched points (n, 1, 1) against (n, n - 1, 1).
    layer = fusedattn.GaussianKernelAttention(bandwidth=1.0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    q, k, v = leave_one_out(x_train, y_train)
    bar = steps_bar(steps, quiet)
    for step in bar:
        pred, _ = layer(q[..., None], k[..., None], v[..., None])
        loss = ((pred.squeeze(-1).squeeze(-1) - y_train) ** 2).mean() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not quiet and (step % 10 == 0 or step == steps):
            bar.set_postfix_str(f"loss {loss.item():.3f} bandwidth {layer.bandwidth.item():.3f}")
    with torch.no_grad():
        learned, learned_w = layer(x_test, x_train, y_train, need_weights=True)

    def mse(pred):
        return ((pred - y_true) ** 2).mean().item()

    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_true": y_true,
            "fixed": fixed, "fixed_weights": fixed_w, "learned": learned,
            "learned_weights": learned_w, "bandwidth": layer.bandwidth.item(),
            "mse_fixed": mse(fixed), "mse_learned": mse(learned)}


def plot(r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(r["x_test"], r["y_true"], "k-", label="truth")
    ax.plot(r["x_test"], r["fixed"], "--", label=f"fixed h=1 (MSE {r['mse_fixed']:.3f})")
    ax.plot(r["x_test"], r["learned"], "-",
            label=f"learned h={r['bandwidth']:.2f} (MSE {r['mse_learned']:.3f})")
    ax.plot(r["x_train"], r["y_train"], "o", alpha=0.5, ms=4, label="training samples")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=8)
    ax.set_title("Nadaraya-Watson fit")
    for ax, key, title in ((axes[1], "fixed_weights", "weights, fixed h=1"),
                           (axes[2], "learned_weights", f"weights, learned h={r['bandwidth']:.2f}")):
        im = ax.imshow(r[key], cmap="Reds", aspect="auto")
        ax.set_xlabel("training point (sorted by x)")
        ax.set_ylabel("query point")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="nadaraya_watson.png")
    args = parser.parse_args(argv)
    r = run(args.steps)
    print(f"test MSE against f: fixed bandwidth 1: {r['mse_fixed']:.4f}; "
          f"learned bandwidth {r['bandwidth']:.3f}: {r['mse_learned']:.4f}")
    plot(r, args.out)
    print(f"wrote {args.out}")
    return r


if __name__ == "__main__":
    main()

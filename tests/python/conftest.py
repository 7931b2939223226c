import math
import os

import pytest
import torch


def reference_attention(q, k, v, attn_mask=None, key_padding_mask=None, is_causal=False,
                        bottom_right=False, scale=None):
    """The formula in fp64, written here: (out, weights); rows with no visible key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    H, Hk, L, S = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2]
    if Hk != H:
        k = k.repeat_interleave(H // Hk, dim=-3)
        v = v.repeat_interleave(H // Hk, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    allowed = torch.ones(L, S, dtype=torch.bool)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.double()
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(*key_padding_mask.shape[:-1], 1, 1, S)
        if kpm.dtype == torch.bool:
            allowed = allowed & ~kpm
        else:
            s = s + kpm.double()
    if is_causal:
        offset = S - L if bottom_right else 0
        allowed = allowed & (torch.arange(S)[None, :] <= torch.arange(L)[:, None] + offset)
    allowed = allowed.expand_as(s)
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1)
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)  # all -inf rows
    return p @ v, p


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # A custom op whose outputs alias its inputs or each other is an error under torch.compile
    # wherever the environment sets CI (torch's default), a warning elsewhere: make it an error
    # on every machine so that such an op fails here as it would in CI.
    import torch._functorch.config
    torch._functorch.config.error_on_custom_op_aliasing = True
    config.addinivalue_line(
        "markers", "own_kernels: compares fusedattn's own kernels with each other; skipped when "
        "FUSEDATTN_ROUTE=torch sends the op to torch's kernels")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FUSEDATTN_ROUTE") != "torch":
        return
    skip = pytest.mark.skip(reason="compares fusedattn's own kernels; FUSEDATTN_ROUTE=torch")
    for item in items:
        if "own_kernels" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    import fusedattn
    route = os.environ.get("FUSEDATTN_ROUTE", "auto")
    return (f"fusedattn CPU tier: {fusedattn.cpu_capability()} "
            f"(this CPU runs {' '.join(fusedattn.cpu_capabilities_supported())}); "
            f"FUSEDATTN_ROUTE={route}")

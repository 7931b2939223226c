"""The seed documents' attention layers as torch.nn.Modules. As with MultiheadAttention,
the C++ module creates and initialises the parameters, and forward runs the registered op
that the C++ forward runs too."""
import torch
import torch.nn as nn
from torch.nn.parameter import Parameter

from . import _C


def _linear(params, name, in_features, out_features, bias):
    """An nn.Linear holding the C++ module's `name.weight` / `name.bias` (built on the meta
    device, so its own initialisation draws no random numbers)."""
    layer = nn.Linear(in_features, out_features, bias=bias, device="meta")
    layer.weight = Parameter(params[f"{name}.weight"])
    layer.bias = Parameter(params[f"{name}.bias"]) if bias else None
    return layer


class SelfAttention(nn.Module):
    """Single-head scaled dot-product self-attention with its own Q/K/V projections.

    ``forward(x, key_padding_mask=None, is_causal=False, need_weights=True)`` with x
    ``(N, T, in_dim)`` or ``(T, in_dim)`` and key_padding_mask ``(N, T)`` (True = padding)
    returns ``(output (N, T, d_v), weights (N, T, T) or None)``.
    """

    def __init__(self, in_dim, d_k, d_v=None, bias=True, device=None, dtype=None):
        super().__init__()
        cpp = _C.cpp.SelfAttention(in_dim, d_k, d_v, bias)
        params = dict(cpp.named_parameters(True))
        self.in_dim, self.d_k, self.d_v = in_dim, d_k, d_v if d_v is not None else d_k
        self.q_proj = _linear(params, "q_proj", in_dim, d_k, bias)
        self.k_proj = _linear(params, "k_proj", in_dim, d_k, bias)
        self.v_proj = _linear(params, "v_proj", in_dim, self.d_v, bias)
        self.to(device=device, dtype=dtype)

    def forward(self, x, key_padding_mask=None, is_causal=False, need_weights=True):
        out, weights = torch.ops.fusedattn.self_attention(
            x, self.q_proj.weight, self.q_proj.bias, self.k_proj.weight, self.k_proj.bias,
            self.v_proj.weight, self.v_proj.bias, key_padding_mask, is_causal, need_weights)
        return out, (weights if need_weights else None)

    def extra_repr(self):
        return f"in_dim={self.in_dim}, d_k={self.d_k}, d_v={self.d_v}"


class AttentionPooling(nn.Module):
    """Many-to-one attention pooling: the last time step queries every step.

    score ``"luong"``: ``h_t . W h_s``; ``"bahdanau"``: ``v . tanh(W1 h_t + W2 h_s)``. The
    output is ``tanh(W_c [context; h_t])`` of size ``units``. ``forward(h, key_padding_mask=None)``
    with h ``(N, T, input_dim)`` returns ``(output (N, units), weights (N, T))``; with a
    padding mask the query is the last step that is not padding.
    """

    def __init__(self, input_dim, units=128, score="luong", device=None, dtype=None):
        super().__init__()
        cpp = _C.cpp.AttentionPooling(input_dim, units, score)
        params = dict(cpp.named_parameters(True))
        self.input_dim, self.units, self.score = input_dim, units, score
        self.score_proj = _linear(params, "score_proj", input_dim, input_dim, False)
        if score == "bahdanau":
            self.query_proj = _linear(params, "query_proj", input_dim, input_dim, False)
            self.score_vector = Parameter(params["score_vector"])
        else:
            self.query_proj = None
            self.score_vector = None
        self.output_proj = _linear(params, "output_proj", 2 * input_dim, units, False)
        self.to(device=device, dtype=dtype)

    def forward(self, h, key_padding_mask=None):
        return torch.ops.fusedattn.attention_pooling(
            h, self.score, self.score_proj.weight,
            self.query_proj.weight if self.query_proj is not None else None, self.score_vector,
            self.output_proj.weight, key_padding_mask)

    def extra_repr(self):
        return f"input_dim={self.input_dim}, units={self.units}, score={self.score!r}"


def gaussian_kernel_attention(query, key, value, bandwidth=1.0, need_weights=False):
    """Nadaraya-Watson kernel regression (Gaussian-kernel attention): weights
    ``softmax_j(-|q_i - k_j|^2 / (2 bandwidth^2))``, output ``weights @ value``.

    query ``(..., L, D)``, key ``(..., S, D)``, value ``(..., S, Dv)``, or 1-D points
    ``(L)``, ``(S)``, ``(S)``. Runs through the fused op (the squared distance is a dot
    product plus a per-key term), so no L x S matrix is built unless ``need_weights``.
    Returns the output, or ``(output, weights)`` with ``need_weights``.
    """
    if not isinstance(bandwidth, torch.Tensor):
        bandwidth = torch.tensor([float(bandwidth)], dtype=query.dtype, device=query.device)
    out, weights = torch.ops.fusedattn.gaussian_kernel_attention(query, key, value, bandwidth,
                                                                 need_weights)
    return (out, weights) if need_weights else out


class GaussianKernelAttention(nn.Module):
    """Gaussian-kernel (Nadaraya-Watson) attention with a learnable bandwidth
    (``learnable=False`` keeps it fixed, as a buffer). ``forward(query, key, value,
    need_weights=False)`` as ``gaussian_kernel_attention``, returning ``(output, weights or None)``.
    """

    def __init__(self, bandwidth=1.0, learnable=True, device=None, dtype=None):
        super().__init__()
        cpp = _C.cpp.GaussianKernelAttention(bandwidth, learnable)
        state = dict(cpp.named_parameters(True)) if learnable else dict(cpp.named_buffers(True))
        if learnable:
            self.bandwidth = Parameter(state["bandwidth"])
        else:
            self.register_buffer("bandwidth", state["bandwidth"])
        self.learnable = learnable
        self.to(device=device, dtype=dtype)

    def forward(self, query, key, value, need_weights=False):
        out, weights = torch.ops.fusedattn.gaussian_kernel_attention(query, key, value,
                                                                     self.bandwidth, need_weights)
        return out, (weights if need_weights else None)

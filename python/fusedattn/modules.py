import operator

import torch
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import Parameter

from . import _C


def _is_int(value):
    try:
        operator.index(value)  # int, numpy ints, SymInt; not float
        return True
    except TypeError:
        return False


class MultiheadAttention(torch.nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention`` on fusedattn's op.

    The constructor and ``forward`` take torch's arguments, plus ``head_dim`` (per-head
    projection size; default ``embed_dim // num_heads``). Parameters are created and
    initialised by the C++ module ``fusedattn._C.cpp.MultiheadAttention`` (same names, shapes
    and initialisation as torch's, so state_dicts load both ways) and ``forward`` runs the
    registered op ``torch.ops.fusedattn.multihead_attention``, the same code the C++ module's
    forward runs, which ``torch.compile`` traces without graph breaks.

    In ``torch.nn.TransformerEncoderLayer`` it stays the attention that runs: its
    ``_qkv_same_embed_dim`` is False, which turns off the layer's own inference fast path.

    Differences from torch: ``is_causal=True`` applies a causal mask by itself (torch needs
    ``attn_mask`` too); returned weights are the probabilities before dropout; a query whose
    keys are all masked gives zeros instead of NaN.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, head_dim=None):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim),
                            ("vdim", vdim), ("head_dim", head_dim)):
            if value is not None and not _is_int(value):
                raise TypeError(f"MultiheadAttention: {name} must be an int, got "
                                f"{type(value).__name__} {value!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"MultiheadAttention: dtype must be a floating-point dtype, got {dtype}")
        cpp = _C.cpp.MultiheadAttention(embed_dim, num_heads, dropout, bias, add_bias_kv,
                                        add_zero_attn, kdim, vdim, batch_first, head_dim)
        params = dict(cpp.named_parameters(True))

        def adopt(name):
            t = params.get(name)
            return None if t is None else Parameter(t.to(device=device, dtype=dtype))

        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = cpp.head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        # torch's Transformer layers read this flag, in eval without grad, to decide to skip
        # self_attn and run their own fused kernel on its weights (which also assumes
        # head_dim == embed_dim // num_heads). False keeps them calling this module; nothing
        # else reads it, since this module picks packed or separate weights by which exist.
        self._qkv_same_embed_dim = False
        # Registration order as in torch (it orders parameters() and optimizer state).
        packed = "in_proj_weight" in params
        names = (["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"] if packed
                 else ["q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_weight"])
        for name in names + ["in_proj_bias"]:
            self.register_parameter(name, adopt(name))
        # Built on the meta device so that its own initialisation draws no random numbers.
        self.out_proj = NonDynamicallyQuantizableLinear(
            num_heads * self.head_dim, embed_dim, bias=bias, device="meta")
        self.out_proj.weight = adopt("out_proj.weight")
        self.out_proj.bias = adopt("out_proj.bias")
        if add_bias_kv:
            self.bias_k = adopt("bias_k")
            self.bias_v = adopt("bias_v")
        else:
            self.bias_k = self.bias_v = None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        out, weights = torch.ops.fusedattn.multihead_attention(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout if self.training else 0.0, self.out_proj.weight,
            self.out_proj.bias, self.batch_first, key_padding_mask, need_weights, attn_mask,
            average_attn_weights, is_causal)
        return out, (weights if need_weights else None)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")

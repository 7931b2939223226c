import copy
import operator
from collections import OrderedDict
from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import Parameter

from . import _C
from . import distributed as _distributed
from .kv_cache import KVCache

# The overloads themselves: a decode step makes one call per layer and token.
_cached_step = torch.ops.fusedattn.multihead_attention_cached.default
_in_projection = torch.ops.fusedattn.multihead_attention_in_projection.default


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

    ``_qkv_same_embed_dim`` says, as in torch, whether ``in_proj_weight`` is packed
    (``kdim == vdim == embed_dim``). Inside ``torch.nn.TransformerEncoderLayer`` this module
    stays the attention that runs: it carries a forward pre-hook that does nothing, and torch's
    layers skip their own inference fast path for any submodule with hooks (that fast path
    would read the weights and run torch's fused kernel instead). ``TransformerEncoder`` may
    still pack a padded batch into a nested tensor for its layers; nested inputs with
    ``batch_first=True`` run here: jagged ones with ``need_weights=False`` as packed sequences
    (their values and offsets, no padding formed), others as a padded batch with a key
    padding mask.

    Packed variable-length sequences (``fusedattn.attention_varlen``'s layout): ``forward(x,
    x, x, cu_seqlens=cu, need_weights=False)`` with ``x (total, E)`` the sequences' rows one
    after another and ``cu (B + 1,)`` int32 offsets (``cu_seqlens_k`` for keys packed
    otherwise; ``max_seqlen``/``max_seqlen_k`` read off the offsets when not given): each
    sequence attends within itself, the cost the sum of ``L_b * S_b``. Returns ``(total, E)``.

    ``torch.jit.script`` compiles ``forward`` (nested inputs are eager-only there).

    Beyond torch, keyword-only: ``window=(left, right)``, ``alibi=True`` (the ALiBi paper's
    slopes for ``num_heads``, buffer ``alibi_slopes``) or a ``(H,)`` tensor of slopes,
    ``max_relative_distance=D`` (a learnable ``rel_bias`` parameter ``(H, 2D+1)``, zeros) and
    ``softcap``: ``fusedattn.attention``'s variants, positions top-left aligned. ``sinks=True``:
    a learnable attention-sink logit per head (parameter ``sinks`` ``(H,)``, zeros) that joins
    each softmax's denominator with no value.

    Differences from torch: ``is_causal=True`` applies a causal mask by itself (torch needs
    ``attn_mask`` too, as a hint it may ignore); with both, the causal mask and ``attn_mask``
    both apply, except where torch ignores the mask (no key padding mask, no weights) and the
    mask does not fit ``(L, S)``: then it is ignored with a warning, as torch does silently.
    Returned weights are the probabilities before dropout; a query whose keys are all masked
    gives zeros instead of NaN.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, head_dim=None, *, window=None, alibi=False,
                 max_relative_distance=None, softcap=None, sinks=False):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim),
                            ("vdim", vdim), ("head_dim", head_dim),
                            ("max_relative_distance", max_relative_distance)):
            if value is not None and not _is_int(value):
                raise TypeError(f"MultiheadAttention: {name} must be an int, got "
                                f"{type(value).__name__} {value!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"MultiheadAttention: dtype must be a floating-point dtype, got {dtype}")
        given_slopes = alibi if isinstance(alibi, torch.Tensor) else None
        cpp = _C.cpp.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
            head_dim=head_dim, window=None if window is None else list(window),
            alibi=given_slopes is None and bool(alibi),
            max_relative_distance=max_relative_distance, softcap=softcap, sinks=bool(sinks))
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
        packed = "in_proj_weight" in params
        # torch's meaning: in_proj_weight holds q|k|v in torch's layout, (3 * embed_dim, E).
        self._qkv_same_embed_dim = packed and num_heads * self.head_dim == embed_dim
        # Registration order as in torch (it orders parameters() and optimizer state).
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
        # The variants (fusedattn.attention's): window, ALiBi slopes (the paper's for
        # num_heads, or given: (H,) fp32), a learnable relative bias table, softcap.
        self.window = None if window is None else [int(w) for w in window]
        self.softcap = None if softcap is None else float(softcap)
        self.max_relative_distance = max_relative_distance
        if given_slopes is not None:
            self.register_buffer("alibi_slopes", given_slopes.detach().to(device=device, dtype=torch.float32))
        elif alibi:
            self.register_buffer("alibi_slopes", dict(cpp.named_buffers(True))["alibi_slopes"].to(device=device))
        else:
            self.alibi_slopes = None
        self.rel_bias = adopt("rel_bias")
        self.sinks = adopt("sinks")
        # torch's TransformerEncoderLayer takes its fused inference path (which bypasses this
        # module) only when no submodule has hooks; this one keeps it calling forward.
        self.register_forward_pre_hook(_keep_module_in_transformer_layers)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, cache: Any = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, cu_seqlens_k: Optional[Tensor] = None,
                max_seqlen_k: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        if cu_seqlens is not None:
            return self._forward_packed(query, key, value, cu_seqlens, max_seqlen, cu_seqlens_k,
                                        max_seqlen_k, need_weights, key_padding_mask, attn_mask,
                                        is_causal), None
        if not torch.jit.is_scripting():
            if cache is not None:
                return self._forward_cached(query, key, value, cache, key_padding_mask,
                                            need_weights, attn_mask, average_attn_weights,
                                            is_causal)
            if _distributed.current_context() is not None:
                return self._forward_context_parallel(query, key, value, key_padding_mask,
                                                      need_weights, attn_mask, is_causal)
            if query.is_nested or key.is_nested or value.is_nested:
                return self._forward_nested(query, key, value, key_padding_mask, need_weights,
                                            attn_mask, average_attn_weights, is_causal)
        # Positional in the schema's order (registration.cpp): keywords cost 3-5 us a call
        # here, 3% of a forward at N=1, L=16, E=256 (AMD EPYC).
        out, weights = torch.ops.fusedattn.multihead_attention(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout if self.training else 0.0, self.out_proj.weight,
            self.out_proj.bias, self.batch_first, key_padding_mask, need_weights, attn_mask,
            average_attn_weights, is_causal, self.window, self.alibi_slopes, self.softcap,
            self.rel_bias, self.sinks)
        return out, (weights if need_weights else None)

    def __prepare_scriptable__(self):
        # TorchScript types a pre-hook's input as all of forward's arguments but calls it with
        # the positional ones only, so a module with one cannot be scripted: the scripted copy
        # goes without it. Scripted Transformer layers may then take their fused inference
        # path over this module in eval without grad (the same attention, torch's kernel).
        twin = copy.copy(self)
        twin._forward_pre_hooks = OrderedDict(
            (k, h) for k, h in self._forward_pre_hooks.items()
            if h is not _keep_module_in_transformer_layers)
        return twin

    def merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    query: Tensor) -> Tuple[Optional[Tensor], Optional[int]]:
        """torch's contract, for code written against ``nn.MultiheadAttention`` (its
        Transformer layers name it, even where the hook above keeps them from calling it):
        the one mask given with its type (1 = key padding ``(N, S)``), or both summed as
        ``(N, H, L, L)`` with type 2 (``attn_mask`` ``(L, L)`` or ``(N * H, L, L)``)."""
        if attn_mask is None:
            return key_padding_mask, (None if key_padding_mask is None else 1)
        n, seq, _ = query.shape
        merged = attn_mask.view(n, self.num_heads, seq, seq) if attn_mask.dim() == 3 else \
            attn_mask.view(1, 1, seq, seq).expand(n, self.num_heads, seq, seq)
        if key_padding_mask is not None:
            merged = merged + key_padding_mask.view(n, 1, 1, seq)
        return merged, 2

    def kv_cache(self, max_batch, max_len, cache_dtype=None):
        """An empty ``KVCache`` for this module's self-attention: ``max_batch`` sequences of up
        to ``max_len`` positions, in the parameters' dtype and device, stored in
        ``cache_dtype`` (default: the parameters' dtype; ``torch.bfloat16``, ``torch.float16``
        or ``torch.int8`` store fewer bytes, see ``KVCache``)."""
        w = self.out_proj.weight
        return KVCache(max_batch, max_len, self.num_heads, self.head_dim, self.head_dim,
                       dtype=w.dtype, device=w.device, cache_dtype=cache_dtype)

    @torch.jit.unused
    def memory_cache(self, memory, key_padding_mask=None, cache_dtype=None):
        """Cross-attention keys and values projected once: a read-only ``KVCache`` over
        ``memory`` (the encoder's output, in the query's layout: ``(S, N, kdim)``, ``(N, S,
        kdim)`` with batch_first, or ``(S, kdim)``), with its ``key_padding_mask (N, S)``.
        ``mha(y, None, None, cache=memory)`` then equals ``mha(y, memory, memory,
        key_padding_mask=key_padding_mask)`` (up to the storage's rounding with a
        ``cache_dtype``, as ``kv_cache``'s)."""
        self._check_cacheable()
        _, k, v = _in_projection(None, memory, memory, self.num_heads, self.in_proj_weight,
                                 self.in_proj_bias, self.q_proj_weight, self.k_proj_weight,
                                 self.v_proj_weight, self.batch_first)
        if key_padding_mask is not None and memory.dim() == 2:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        return KVCache.from_tensors(k, v, key_padding_mask=key_padding_mask,
                                    cache_dtype=cache_dtype)

    def _check_cacheable(self, what="a KV cache"):
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError(f"MultiheadAttention: {what} does not take add_bias_kv or "
                             "add_zero_attn")
        if (self.window is not None or self.alibi_slopes is not None or self.softcap is not None
                or self.rel_bias is not None or self.sinks is not None):
            raise ValueError(f"MultiheadAttention: {what} does not take the variants (window, "
                             "alibi, max_relative_distance, softcap) or sinks")

    @torch.jit.unused
    def _forward_cached(self, query, key, value, cache, key_padding_mask, need_weights,
                        attn_mask, average_attn_weights, is_causal):
        """Incremental decoding: the new tokens ``query`` (and, for self-attention, the same
        tensor as key and value, appended to the cache) against every cached position: the
        op ``multihead_attention_cached``, one call per layer and token."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"MultiheadAttention: cache must be a fusedattn.KVCache, got "
                            f"{type(cache).__name__}")
        self._check_cacheable()
        if attn_mask is not None:
            raise ValueError("MultiheadAttention: with a cache, attn_mask is not supported; "
                             "use is_causal and key_padding_mask (over the cached positions)")
        if self.training and self.dropout > 0:
            raise ValueError("MultiheadAttention: a KV cache decodes without dropout; call "
                             ".eval() (or build the module with dropout=0)")
        result, weights = _cached_step(
            query, key, value, cache.key_cache, cache.value_cache, cache.lengths, self.num_heads,
            self.in_proj_weight, self.in_proj_bias, self.q_proj_weight, self.k_proj_weight,
            self.v_proj_weight, self.out_proj.weight, self.out_proj.bias,
            batch_first=self.batch_first, key_padding_mask=key_padding_mask,
            need_weights=need_weights, average_attn_weights=average_attn_weights,
            is_causal=is_causal, read_only=cache.read_only,
            cache_key_padding_mask=cache.key_padding_mask, key_scales=cache.key_scales,
            value_scales=cache.value_scales)
        return result, (weights if need_weights else None)

    @torch.jit.unused
    def _forward_context_parallel(self, query, key, value, key_padding_mask, need_weights,
                                  attn_mask, is_causal):
        """Under ``fusedattn.distributed.context_parallel``: the inputs are this rank's
        sequence shards; projections on them, ring attention between them."""
        group, layout = _distributed.current_context()
        self._check_cacheable("context_parallel")
        if need_weights or attn_mask is not None:
            raise ValueError("MultiheadAttention: under context_parallel pass need_weights=False "
                             "and no attn_mask (use is_causal and key_padding_mask)")
        if self.training and self.dropout > 0:
            raise ValueError("MultiheadAttention: under context_parallel dropout is not "
                             "supported; build the module with dropout=0 or call .eval()")
        if query.dim() != 3:
            raise ValueError("MultiheadAttention: under context_parallel the inputs must be 3-D")
        q, k, v = _in_projection(query, key, value, self.num_heads, self.in_proj_weight,
                                 self.in_proj_bias, self.q_proj_weight, self.k_proj_weight,
                                 self.v_proj_weight, self.batch_first)
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise ValueError("MultiheadAttention: under context_parallel key_padding_mask must "
                             "be bool")
        out = _distributed.ring_attention(q, k, v, group=group, layout=layout,
                                          is_causal=is_causal, key_padding_mask=key_padding_mask)
        n, h, t, dv = out.shape
        result = torch.nn.functional.linear(out.transpose(1, 2).reshape(n, t, h * dv),
                                            self.out_proj.weight, self.out_proj.bias)
        return (result if self.batch_first else result.transpose(0, 1)), None

    def _forward_packed(self, query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor,
                        max_seqlen: Optional[int], cu_seqlens_k: Optional[Tensor],
                        max_seqlen_k: Optional[int], need_weights: bool,
                        key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                        is_causal: bool) -> Tensor:
        """Packed variable-length sequences: query (total_q, E), key and value (total_k,
        kdim|vdim), sequence b at rows cu_seqlens[b] .. cu_seqlens[b + 1] (cu_seqlens_k for key
        and value when they are packed otherwise); each attends within itself only."""
        if need_weights:
            raise ValueError("MultiheadAttention: packed sequences (cu_seqlens) return no "
                             "weights: pass need_weights=False")
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError("MultiheadAttention: with cu_seqlens the offsets are the padding; "
                             "key_padding_mask and attn_mask must be None")
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("MultiheadAttention: packed sequences (cu_seqlens) do not take "
                             "add_bias_kv or add_zero_attn")
        cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
        if max_seqlen is None:
            max_seqlen = _longest(cu_seqlens)
        if max_seqlen_k is None:
            max_seqlen_k = max_seqlen if cu_seqlens_k is None else _longest(cu_k)
        return torch.ops.fusedattn.multihead_attention_varlen(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight,
            self.dropout if self.training else 0.0, self.out_proj.weight, self.out_proj.bias,
            cu_seqlens, cu_k, max_seqlen, max_seqlen_k, is_causal, self.window,
            self.alibi_slopes, self.softcap, self.rel_bias, self.sinks)

    @torch.jit.unused
    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal):
        """Nested (jagged or strided) batch-first inputs as a padded batch: keys beyond each
        sequence's length are key padding, outputs beyond it are dropped. Returns the output in
        the query's layout and, when asked, the weights padded, (N, L_max, S_max)."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not t.is_nested:
                raise ValueError(f"MultiheadAttention: with a nested query, key and value must "
                                 f"be nested too, got a dense {name}")
            if t.dim() != 3:
                raise ValueError(f"MultiheadAttention: nested {name} must be 3-D (N, L*, E), "
                                 f"got {t.dim()}-D")
        if not self.batch_first:
            raise ValueError("MultiheadAttention: nested inputs need batch_first=True (the "
                             "nested dim is the batch)")
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError("MultiheadAttention: with nested inputs the lengths are the "
                             "padding; key_padding_mask and attn_mask must be None")
        jagged = all(t.layout == torch.jagged for t in (query, key, value))
        if jagged and not need_weights and self.bias_k is None and not self.add_zero_attn:
            # Jagged inputs are the packed layout already (values and offsets): no padding.
            q = query.values()
            k = q if key is query else key.values()
            v = k if value is key else value.values()
            if not torch.equal(key.offsets(), value.offsets()):
                raise ValueError("MultiheadAttention: nested key and value must have the same "
                                 "sequence lengths")
            out = self._forward_packed(q, k, v, query.offsets(), None, key.offsets(), None,
                                       False, None, None, is_causal)
            return torch.nested.nested_tensor_from_jagged(out, query.offsets()), None
        q_len, k_len = _nested_lengths(query), _nested_lengths(key)
        if not torch.equal(k_len, _nested_lengths(value)):
            raise ValueError("MultiheadAttention: nested key and value must have the same "
                             "sequence lengths")
        q = query.to_padded_tensor(0.0)
        k = q if key is query else key.to_padded_tensor(0.0)
        v = k if value is key else value.to_padded_tensor(0.0)
        padding = torch.arange(k.size(1), device=k.device) >= k_len.to(k.device).unsqueeze(1)
        out, weights = self.forward(q, k, v, key_padding_mask=padding, need_weights=need_weights,
                                    average_attn_weights=average_attn_weights, is_causal=is_causal)
        valid = torch.arange(q.size(1), device=q.device) < q_len.to(q.device).unsqueeze(1)
        if query.layout == torch.jagged:
            out = torch.nested.nested_tensor_from_jagged(out[valid], query.offsets())
        else:
            out = torch._nested_tensor_from_mask(out, valid, mask_check=False)
        return out, weights

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}"
                + (f", window={self.window}" if self.window is not None else "")
                + (", alibi=True" if self.alibi_slopes is not None else "")
                + (f", max_relative_distance={self.max_relative_distance}"
                   if self.rel_bias is not None else "")
                + (f", softcap={self.softcap}" if self.softcap is not None else "")
                + (", sinks=True" if self.sinks is not None else ""))


# TorchScript compiles hooks too: the input tuple is typed as forward's arguments.
def _keep_module_in_transformer_layers(
        module: torch.nn.Module,
        args: Tuple[Tensor, Tensor, Tensor, Optional[Tensor], bool, Optional[Tensor], bool, bool],
) -> None:
    return None


def _longest(cu_seqlens: Tensor) -> int:
    """The longest sequence of (B + 1,) offsets (a host read)."""
    return int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0


def _nested_lengths(t):
    """Sequence lengths (N,) of a nested tensor (N, L*, E), jagged or strided."""
    if t.layout == torch.jagged:
        return t.offsets().diff()
    return t._nested_tensor_size()[:, 0]

"""Fake (meta) kernels: output shapes for torch.compile and opcheck (contiguous tensors). They
run the C++ argument checks (on symbolic sizes too), and refuse tensors on another device
than query's, which would otherwise route a real call here."""
import torch

from . import _C


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_dtype(dtype, fp32_out):
    # fp32_out widens bf16/fp16 outputs only (the forwards' flag, ops/params.h).
    return torch.float32 if fp32_out and dtype in (torch.bfloat16, torch.float16) else dtype


def _check_shapes(query, key, value, attn_mask, key_padding_mask, dropout_p, scale, enable_gqa,
                  window=None, alibi_slopes=None, softcap=None, rel_bias=None):
    # The real kernels' checks (one implementation, in C++, on SymInts): with symbolic sizes
    # (dynamic shapes) a check that tracing cannot decide becomes a guard or a run-time assert.
    _C._check_attention_arguments(query, key, value, attn_mask, key_padding_mask, dropout_p,
                                  scale, enable_gqa, window, alibi_slopes, softcap, rel_bias)


def _check_devices(query, **others):
    # A tensor on another device (a meta mask beside CPU inputs) dispatches the whole call
    # here, to kernels that only shape outputs: the real kernels' device check, made here too.
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == query.device,
                         lambda: f"attention: {name} must be on query's device ({query.device}), "
                                 f"got {t.device}")


@torch.library.register_fake("fusedattn::_attention_forward")
def _attention_forward_fake(query, key, value, attn_mask, key_padding_mask, dropout_seed,
                            dropout_p, is_causal, bottom_right, scale, enable_gqa,
                            return_weights, average_weights=False, window=None,
                            alibi_slopes=None, softcap=None, rel_bias=None, fp32_out=False):
    torch._check(query.dim() >= 3, lambda: "attention: query must have at least 3 dims")
    _check_devices(query, key=key, value=value, attn_mask=attn_mask,
                   key_padding_mask=key_padding_mask, alibi_slopes=alibi_slopes,
                   rel_bias=rel_bias)
    _check_shapes(query, key, value, attn_mask, key_padding_mask, dropout_p, scale, enable_gqa,
                  window, alibi_slopes, softcap, rel_bias)
    *batch, heads, q_len, _ = query.shape
    kv_len, v_dim = key.shape[-2], value.shape[-1]
    out = query.new_empty((*batch, heads, q_len, v_dim), dtype=_out_dtype(query.dtype, fp32_out))
    lse = query.new_empty((*batch, heads, q_len), dtype=_accumulate_dtype(query.dtype))
    if not return_weights:
        weights = query.new_empty((0,))
    elif average_weights:
        weights = query.new_empty((*batch, q_len, kv_len))
    else:
        weights = query.new_empty((*batch, heads, q_len, kv_len))
    return out, lse, weights


@torch.library.register_fake("fusedattn::_attention_backward")
def _attention_backward_fake(grad_out, grad_weights, grad_lse, query, key, value, out, lse,
                             attn_mask, key_padding_mask, dropout_seed, dropout_p, is_causal,
                             bottom_right, scale, enable_gqa, attn_mask_grad,
                             key_padding_mask_grad, window=None, alibi_slopes=None, softcap=None,
                             rel_bias=None):
    _check_devices(query, grad_out=grad_out, key=key, value=value, out=out, lse=lse,
                   attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                   alibi_slopes=alibi_slopes, rel_bias=rel_bias)
    _check_shapes(query, key, value, attn_mask, key_padding_mask, dropout_p, scale, enable_gqa,
                  window, alibi_slopes, softcap, rel_bias)

    def grad_of(mask, wanted):
        if wanted and mask is not None and mask.is_floating_point():
            return mask.new_empty(mask.shape)
        return query.new_empty((0,))

    # rel_bias's gradient comes in the accumulate type, cast by the autograd kernel.
    d_rel = (query.new_empty((0,)) if rel_bias is None
             else rel_bias.new_empty(rel_bias.shape, dtype=_accumulate_dtype(query.dtype)))
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            grad_of(attn_mask, attn_mask_grad), grad_of(key_padding_mask, key_padding_mask_grad),
            d_rel)


def _projected_sizes(query, key, value, seq_first):
    """(N, L, S, H * Dv) of _attention_projected_forward's three forms."""
    torch._check(query.dim() == 3, lambda: "attention_projected: query must be 3-D")
    n, seq_q = (query.shape[1], query.shape[0]) if seq_first else query.shape[:2]
    kv = query if key is None else key
    seq_k = kv.shape[0] if seq_first else kv.shape[1]
    if key is None:
        out_features = query.shape[2] // 3
    elif value is None:
        out_features = key.shape[2] // 2
    else:
        out_features = value.shape[2]
    return n, seq_q, seq_k, out_features


@torch.library.register_fake("fusedattn::_attention_projected_forward")
def _attention_projected_forward_fake(query, key, value, num_heads, seq_first, attn_mask,
                                      key_padding_mask, dropout_seed, dropout_p, is_causal,
                                      return_weights, average_weights, fp32_out=False):
    _check_devices(query, key=key, value=value, attn_mask=attn_mask,
                   key_padding_mask=key_padding_mask)
    n, seq_q, seq_k, out_features = _projected_sizes(query, key, value, seq_first)
    out = query.new_empty((*query.shape[:2], out_features),
                          dtype=_out_dtype(query.dtype, fp32_out))
    lse = query.new_empty((n, num_heads, seq_q), dtype=_accumulate_dtype(query.dtype))
    if not return_weights:
        weights = query.new_empty((0,))
    elif average_weights:
        weights = query.new_empty((n, seq_q, seq_k))
    else:
        weights = query.new_empty((n, num_heads, seq_q, seq_k))
    return out, lse, weights


@torch.library.register_fake("fusedattn::_attention_projected_backward")
def _attention_projected_backward_fake(grad_out, grad_weights, grad_lse, query, key, value, out,
                                       lse, num_heads, seq_first, attn_mask, key_padding_mask,
                                       dropout_seed, dropout_p, is_causal, attn_mask_grad,
                                       key_padding_mask_grad):
    _check_devices(query, grad_out=grad_out, key=key, value=value, out=out, lse=lse,
                   attn_mask=attn_mask, key_padding_mask=key_padding_mask)

    def like(t):
        return query.new_empty((0,)) if t is None else t.new_empty(t.shape)

    def grad_of(mask, wanted):
        return like(mask) if wanted and mask is not None and mask.is_floating_point() else like(None)

    return (like(query), like(key), like(value), grad_of(attn_mask, attn_mask_grad),
            grad_of(key_padding_mask, key_padding_mask_grad))


@torch.library.register_fake("fusedattn::kv_cache_attention")
def _kv_cache_attention_fake(query, key, value, key_cache, value_cache, lengths, *, scale=None,
                             is_causal=False, key_padding_mask=None, enable_gqa=False,
                             return_lse=False, return_weights=False, key_scales=None,
                             value_scales=None):
    # Shapes only: the lengths' values (a full cache) are checked by the real kernel.
    _C._check_kv_cache_arguments(query, key, value, key_cache, value_cache, lengths,
                                 key_padding_mask, enable_gqa, key_scales, value_scales)
    b, h, t, _ = query.shape
    out = query.new_empty((b, h, t, value_cache.shape[-1]))
    acc = _accumulate_dtype(query.dtype)
    lse = query.new_empty((b, h, t) if return_lse else (0,), dtype=acc)
    weights = query.new_empty((b, h, t, key_cache.shape[2]) if return_weights else (0,))
    return out, lse, weights


def _check_varlen_shapes(query, key, value, cu_seqlens_q, cu_seqlens_k):
    # Shapes only: the offsets' values are checked by the real kernels.
    torch._check(query.dim() == 3 and key.dim() == 3 and value.dim() == 3,
                 lambda: "attention_varlen: query, key and value must be 3-D")
    torch._check(cu_seqlens_q.dim() == 1 and cu_seqlens_k.dim() == 1,
                 lambda: "attention_varlen: cu_seqlens_q and cu_seqlens_k must be 1-D")
    torch._check(cu_seqlens_q.shape[0] == cu_seqlens_k.shape[0],
                 lambda: "attention_varlen: cu_seqlens_q and cu_seqlens_k must hold the same "
                         "number of sequences")


@torch.library.register_fake("fusedattn::_attention_varlen_forward")
def _attention_varlen_forward_fake(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, dropout_seed, dropout_p, is_causal, bottom_right,
                                   scale, enable_gqa, window, alibi_slopes, softcap, rel_bias,
                                   fp32_out=False):
    _check_devices(query, key=key, value=value, alibi_slopes=alibi_slopes, rel_bias=rel_bias)
    _check_varlen_shapes(query, key, value, cu_seqlens_q, cu_seqlens_k)
    total_q, heads, _ = query.shape
    out = query.new_empty((total_q, heads, value.shape[2]), dtype=_out_dtype(query.dtype, fp32_out))
    lse = query.new_empty((heads, total_q), dtype=_accumulate_dtype(query.dtype))
    return out, lse


@torch.library.register_fake("fusedattn::_attention_varlen_backward")
def _attention_varlen_backward_fake(grad_out, grad_lse, query, key, value, out, lse, cu_seqlens_q,
                                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_seed,
                                    dropout_p, is_causal, bottom_right, scale, enable_gqa, window,
                                    alibi_slopes, softcap, rel_bias):
    _check_devices(query, grad_out=grad_out, key=key, value=value, out=out, lse=lse,
                   alibi_slopes=alibi_slopes, rel_bias=rel_bias)
    _check_varlen_shapes(query, key, value, cu_seqlens_q, cu_seqlens_k)
    d_rel = (query.new_empty((0,)) if rel_bias is None
             else rel_bias.new_empty(rel_bias.shape, dtype=_accumulate_dtype(query.dtype)))
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            d_rel)
